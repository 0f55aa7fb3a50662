"""
Training configuration: every key train.py takes, with its default, type and range, read from a
config file (plain Python assignments) and `--key=value` overrides. train.py and study.py share it.

The model keys are the dense GPT's dimensions (model.GPTConfig) and the compression keys
(compress.KEYS); TrainConfig.model holds those a config sets (the rest take their defaults, or the
architecture of the checkpoint or Hugging Face model a run starts from). They are resolved and
checked once, into a GPTConfig and a compress.Compression, before a run touches anything.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from checkpoints import source_spec
from compress import INIT_ONLY, KEYS as COMPRESSION_KEYS, Compression, resolve
from model import GPTConfig

OWT_TOKENS = 9.0e9                     # GPT-2 tokens in OpenWebText


class TrainError(RuntimeError):
    """A problem the user can fix; the scripts print it without a traceback."""


class ConfigError(TrainError):
    """A config key or value that cannot work (the CLIs exit with code 2, as argparse does)."""


# -----------------------------------------------------------------------------
# Configuration

def key(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """The training keys (nanoGPT's names). As in nanoGPT, the defaults are the main recipe, the
    pre-training of Krony-PT (section 4.1 of the paper): 24 sequences of 1024 tokens per forward,
    accumulation 5 (120 sequences, 122,880 tokens per step), AdamW, cosine 6e-5 -> 6e-6 after 1000
    warm-up steps, ~3 epochs of OpenWebText, bf16. Configs set only what differs."""
    # I/O
    out_dir: str = key("out", "directory of this run's checkpoints (one run per directory)")
    data_dir: str = key("data/openwebtext", "train.bin / val.bin / meta.json of prepare_owt.py")
    data_prepare: Optional[dict] = key(None, "prepare_owt arguments (and 'url'): prepare data_dir if missing")
    init_from: str = key("scratch", "scratch | resume | gpt2... | a Hugging Face directory | a checkpoint or run directory")
    overwrite: bool = key(False, "start over in an out_dir that holds another run (its checkpoints are deleted)")
    eval_interval: int = key(1000, "evaluate and checkpoint every this many steps (and at the last)")
    eval_iters: int = key(200, "batches per split and evaluation (0: checkpoint without evaluating)")
    eval_at_start: bool = key(True, "evaluate once before the first step (the loss right after compression)")
    log_interval: int = key(10, "print the training loss every this many steps")
    always_save_checkpoint: bool = key(True, "ckpt_last.pt at every evaluation (False: only with a new best)")
    # wandb
    wandb_log: bool = key(False, "log to Weights & Biases")
    wandb_project: str = key("krony", "wandb project")
    wandb_run_name: str = key("", "wandb run name")
    wandb_mode: str = key("", "'' (wandb's default / WANDB_MODE) | online | offline | disabled")
    # data
    batch_size: int = key(24, "sequences per micro-step and process")
    gradient_accumulation_steps: int = key(5, "micro-steps per optimizer step, summed over all processes")
    block_size: int = key(1024, "tokens per sequence (and the context of a model built from scratch)")
    # AdamW and its schedule: linear warm-up, then cosine down to min_lr (or constant)
    max_iters: int = key(int(3 * OWT_TOKENS / (24 * 1024 * 5)), "optimizer steps (219,726 = 3 epochs of OpenWebText)")
    learning_rate: float = key(6e-5, "peak learning rate")
    weight_decay: float = key(0.1, "AdamW weight decay of 2-D weights")
    decay_factors: bool = key(True, "weight decay on Kronecker factors A, B too")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    grad_clip: float = key(1.0, "clip the gradient norm (0: off)")
    decay_lr: bool = key(True, "cosine decay (False: constant learning_rate)")
    warmup_iters: int = key(1000, "linear warm-up steps")
    lr_decay_iters: int = key(0, "steps of the cosine (0: max_iters)")
    min_lr: float = key(6e-6, "learning rate at the end of the cosine")
    # knowledge distillation
    distill_from: str = key("", "teacher: hub name, HF directory, checkpoint or run directory ('' = none)")
    distill_alpha: float = key(0.5, "weight of the soft-target KL term (cross-entropy gets 1 - alpha)")
    distill_temperature: float = key(2.0, "temperature of the soft targets")
    distill_hidden: float = key(0.0, "weight of the hidden-state MSE after each block (needs equal depth and width)")
    distill_chunk: int = key(256, "positions per chunk of the KL over the vocabulary (bounds its memory)")
    # system
    device: str = key("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = key("bfloat16", "bfloat16 | float16 | float32 (autocast; CPU always runs float32)")
    compile: bool = key(False, "torch.compile the model")
    seed: int = key(1337, "seed of the init, dropout and batch sampling")
    peak_flops: float = key(0.0, "for MFU; 0 = look the GPU up (A100 bf16 312e12 if unknown)")
    # the model: the GPTConfig and compression keys the config file or the command line set (the
    # rest take their defaults, or the checkpoint's / Hugging Face model's architecture)
    model: dict = field(default_factory=dict)

    def check(self) -> None:
        """Every value in range, before any work starts (ConfigError names the key and the fix)."""
        positive = ("batch_size", "gradient_accumulation_steps", "block_size", "eval_interval", "log_interval",
                    "distill_chunk")
        non_negative = ("max_iters", "eval_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip",
                        "min_lr", "peak_flops", "distill_hidden")
        for k in positive:
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)!r} must be at least 1")
        for k in non_negative:
            if getattr(self, k) < 0:
                raise ConfigError(f"{k}={getattr(self, k)!r} must be >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be > 0 (the paper's is 6e-5)")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)!r} must be in [0, 1)")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill_alpha={self.distill_alpha!r} must be in [0, 1]")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature={self.distill_temperature!r} must be > 0")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r}; choose bfloat16, float16 or float32")
        if self.wandb_mode not in ("", "online", "offline", "disabled"):
            raise ConfigError(f"wandb_mode={self.wandb_mode!r}; choose '', online, offline or disabled")
        if not self.out_dir:
            raise ConfigError("out_dir must name a directory")
        if self.data_prepare is not None and not isinstance(self.data_prepare, dict):
            raise ConfigError(f"data_prepare={self.data_prepare!r} must be a dict of prepare_owt arguments")
        try:
            self.model_spec()
        except FileNotFoundError:
            pass                    # init_from may name a checkpoint a run has yet to write

    def model_spec(self, source: tuple[GPTConfig, dict] | None = None) -> tuple[GPTConfig, Compression] | None:
        """The GPTConfig and Compression this run trains, checked (compression settings, factor shapes
        against the matrices): of a model from scratch, or of `source` (the dimensions and compression
        keys of the model init_from names; read from its files when it is local) with the config's model
        keys applied. None where that is not known before loading (a hub model not downloaded yet, or a
        resumed run: its checkpoint decides). FileNotFoundError when init_from names nothing."""
        if self.init_from == "resume":
            return None
        if source is None and self.init_from != "scratch":
            try:
                source = source_spec(self.init_from)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"init_from={self.init_from!r}: {e}") from None
            if source is None:
                return None
        dims = {k: v for k, v in self.model.items() if k not in COMPRESSION_KEYS}
        keys = {k: v for k, v in self.model.items() if k in COMPRESSION_KEYS}
        try:
            if source is None:
                config = GPTConfig(block_size=self.block_size, **dims)
            else:       # the source fixes the dimensions; every other model key the config sets changes it
                config = replace(source[0], **{k: v for k, v in dims.items() if k not in DIMENSIONS})
                keys = {**source[1], **keys}
            return config, resolve(config, **keys)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None

    def flat(self) -> dict:
        """Every key, the model's with GPTConfig's defaults filled in: what checkpoints store."""
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        return {**MODEL_DEFAULTS, **self.model, **d}


# the GPTConfig fields that fix every tensor's shape outside the compressed layers: a model loaded
# from init_from keeps its own
DIMENSIONS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "layer_norm_epsilon")
# --help for the model keys: GPTConfig's here, the compression keys' in compress.KEYS
MODEL_HELP = {
    "vocab_size": "tokens of the vocabulary", "n_layer": "transformer blocks", "n_head": "attention heads",
    "n_embd": "width of the residual stream", "dropout": "dropout probability", "bias": "biases in linears and LayerNorms",
    "layer_norm_epsilon": "LayerNorm epsilon",
    "untied_head": "the output matrix a trained copy of the embedding (KnGPT-2, TQCompressedGPT2) instead of tied",
    **{k: help for k, (_, _, help) in COMPRESSION_KEYS.items()},
}
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "model")
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != "block_size") + tuple(COMPRESSION_KEYS)
MODEL_DEFAULTS = {**{f.name: f.default for f in fields(GPTConfig) if f.name != "block_size"},
                  **{k: default for k, (default, _, _) in COMPRESSION_KEYS.items()}}
TYPES = {**typing.get_type_hints(GPTConfig), **{k: hint for k, (_, hint, _) in COMPRESSION_KEYS.items()},
         **typing.get_type_hints(TrainConfig)}
# keys that change the model itself: fixed for the life of a run, like the optimizer's structure
FIXED_ON_RESUME = tuple(k for k in MODEL_KEYS if k not in INIT_ONLY and k != "dropout") + ("decay_factors",)
# keys that say nothing about what a run computes: a run is "the same" whatever they are
# (out_dir too: a run directory moved elsewhere holds the same run)
BOOKKEEPING = ("out_dir", "init_from", "overwrite", "wandb_log", "wandb_project", "wandb_run_name", "wandb_mode",
               "compile", "log_interval", "device", "dtype_used", "world_size")


def check_value(key: str, value, hint):
    """`value` as the type the key's annotation names, or ConfigError."""
    if typing.get_origin(hint) is typing.Union:                  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):        # inf or nan passes every range check, then breaks a run
            raise ConfigError(f"{key}={value!r} is not a finite number")
    elif hint in (tuple, list):
        ok = isinstance(value, (tuple, list))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {name}")
    return value


def unknown_key_error(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, TRAIN_KEYS + MODEL_KEYS, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else " Run `python train.py --help` for the keys."
    return ConfigError(f"unknown config key {name!r} in {where}.{hint}")


def load_config_file(path: str) -> dict:
    """The assignments of a Python config file (names starting with '_', modules and functions skipped)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no such config file: {path}")
    namespace: dict = {"__file__": os.path.abspath(path)}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as e:
        line = getattr(e, "lineno", None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)}


def parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"overrides look like --key=value (after the config file), got {arg!r}")
    name, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text                      # a bare word: a string (init_from=gpt2, device=cuda)
    return name, value


def resolve_config(config_file: str | None, overrides: list[str]) -> TrainConfig:
    """Defaults <- config file <- --key=value overrides, type-checked and range-checked."""
    sources = []
    if config_file:
        sources += [(k, v, config_file) for k, v in load_config_file(config_file).items()]
    sources += [(*parse_override(a), "the command line") for a in overrides]
    return config_from(sources)


def config_from(sources: list[tuple[str, object, str]]) -> TrainConfig:
    """A checked TrainConfig from (key, value, where it was set) in order, later ones winning."""
    cfg = TrainConfig()
    for name, value, where in sources:
        if name in TRAIN_KEYS:
            setattr(cfg, name, check_value(name, value, TYPES[name]))
        elif name in MODEL_KEYS:
            cfg.model[name] = check_value(name, value, TYPES[name])
        else:
            raise unknown_key_error(name, where)
    cfg.check()
    return cfg


def config_diff(old: dict, new: dict, skip=BOOKKEEPING) -> dict[str, tuple]:
    """{key: (old, new)} for every key whose value differs (missing old keys take the defaults)."""
    old = {**TrainConfig().flat(), **old}
    same = lambda a, b: a == b or (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and list(a) == list(b))
    return {k: (old.get(k), v) for k, v in new.items() if k not in skip and not same(old.get(k), v)}


def format_diff(diff: dict) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def to_overrides(cfg: TrainConfig) -> list[str]:
    """--key=value arguments from which train.py resolves exactly `cfg` (keys at their default left out)."""
    default = TrainConfig()
    args = [f"--{k}={getattr(cfg, k)!r}" for k in TRAIN_KEYS if getattr(cfg, k) != getattr(default, k)]
    return args + [f"--{k}={v!r}" for k, v in cfg.model.items()]
