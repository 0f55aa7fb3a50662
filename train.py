"""
Config-driven training of (Kronecker-compressed) GPT-2, one process or torchrun.

    python train.py configs/quickstart.py                     # laptop CPU, minutes
    python train.py configs/krony81m.py                       # one GPU
    python train.py configs/krony81m.py --batch_size=12 --max_iters=1000
    torchrun --standalone --nproc_per_node=8 train.py configs/krony81m.py \\
        --gradient_accumulation_steps=8 --batch_size=15

A config file is plain Python assignments (`batch_size = 24`); names starting
with "_" are helpers and ignored. `--key=value` overrides a key; values are parsed
with ast.literal_eval (`--kron_shape=(1536,384)`, `--decay_lr=False`) and fall back
to a string (`--init_from=gpt2`). Unknown keys and values of the wrong type are
errors. Every GPTConfig field (mlp, kron_shape, kron_factors, ...) is a key too.

init_from:
  scratch                      a new model built from the config's GPTConfig keys
  gpt2, gpt2-medium, ..., DIR  a Hugging Face GPT-2 (hub name or local directory),
                               then compressed as mlp / kron_* say (per-layer report printed)
  resume                       out_dir/ckpt_last.pt: model, optimizer, iteration, data RNG
  PATH.pt (or a run dir)       weights only (e.g. the best checkpoint of a pre-training
                               run, for the fine-tuning phase): fresh optimizer, iteration 0

Checkpoints (out_dir): ckpt_last.pt at every evaluation, ckpt_best.pt when the
validation loss improves; both written atomically and holding the resolved config.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import gc
import inspect
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, fields

import torch
import torch.nn as nn

from data import TokenData
from kronecker import KronLinear
from model import GPT, GPTConfig, compress, format_report, load_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))

# Training keys and their defaults (nanoGPT's names). The model keys come from GPTConfig.
# As in nanoGPT, the defaults are the main recipe, the pre-training of Krony-PT (paper section
# 4.1): 24 sequences of 1024 tokens per forward, accumulation 5 (120 sequences, 122,880 tokens
# per step), AdamW, cosine 6e-5 -> 6e-6 after 1000 warm-up steps, ~3 epochs of OpenWebText
# (~9B tokens), bf16. Configs set only what differs.
OWT_TOKENS = 9.0e9
TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out",
    data_dir="data/openwebtext",
    data_prepare=None,            # dict of prepare_owt.prepare() arguments: prepare data_dir if it is missing
    init_from="scratch",          # scratch | gpt2... | HF dir | resume | checkpoint path
    eval_interval=1000,
    eval_iters=200,
    eval_at_start=True,           # evaluate once before the first step (the loss right after compression)
    log_interval=10,
    always_save_checkpoint=True,  # ckpt_last.pt at every eval (False: only together with a new ckpt_best.pt)
    # wandb
    wandb_log=False,
    wandb_project="krony",
    wandb_run_name="",
    wandb_mode="",                # "" (wandb's default / WANDB_MODE) | online | offline
    # data
    batch_size=24,                # sequences per micro-step and process
    gradient_accumulation_steps=5,  # micro-steps per optimizer step, summed over all processes
    # AdamW
    max_iters=int(3 * OWT_TOKENS / (24 * 1024 * 5)),  # 219,726 steps = 3 epochs of OpenWebText
    learning_rate=6e-5,
    weight_decay=0.1,
    decay_factors=True,           # weight decay on Kronecker factors A, B too (as on 2-D weights)
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                # 0 disables
    # learning-rate schedule: linear warm-up, then cosine down to min_lr (or constant)
    decay_lr=True,
    warmup_iters=1000,
    lr_decay_iters=0,             # 0: max_iters
    min_lr=6e-6,
    # system
    device="auto",                # auto | cpu | cuda | cuda:N | mps
    dtype="bfloat16",             # bfloat16 | float16 | float32 (CPU always runs float32)
    compile=False,
    seed=1337,
    peak_flops=0.0,               # for MFU; 0 = look up the GPU (A100 bf16 312e12 if unknown)
)
MODEL_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.default is not MISSING}
DEFAULTS = {**MODEL_DEFAULTS, **TRAIN_DEFAULTS}   # block_size is both: the model's and the training length
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig))
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "layer_norm_epsilon")
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12,
              "V100": 125e12, "4090": 165e12, "3090": 71e12}


class TrainError(RuntimeError):
    """A problem the user can fix; `python train.py` prints it without a traceback."""


class ConfigError(TrainError):
    pass


class TrainingDiverged(TrainError):
    pass


# -----------------------------------------------------------------------------
# Configuration

def check_value(key: str, value, default):
    """`value` converted to the type of `default`, or ConfigError. A default of None accepts anything."""
    if default is None or value is None and key in MODEL_KEYS and MODEL_DEFAULTS.get(key) is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {type(default).__name__} "
                          f"(default {default!r})")
    return value


def unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, DEFAULTS, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else " Run `python train.py --help` for the keys."
    return ConfigError(f"unknown config key {key!r} in {where}.{hint}")


def load_config_file(path: str) -> dict:
    """The assignments of a Python config file (names starting with '_', modules and functions skipped)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no such config file: {path}")
    namespace: dict = {"__file__": os.path.abspath(path)}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)}


def parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"overrides look like --key=value (after the config file), got {arg!r}")
    key, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text                      # a bare word: a string (init_from=gpt2, device=cuda)
    return key, value


def resolve_config(config_file: str | None, overrides: list[str]) -> tuple[dict, set[str]]:
    """Defaults <- config file <- --key=value overrides; returns the config and the keys set explicitly."""
    cfg, explicit = dict(DEFAULTS), set()
    sources = []
    if config_file:
        sources += [(k, v, config_file) for k, v in load_config_file(config_file).items()]
    sources += [(*parse_override(a), "the command line") for a in overrides]
    for key, value, where in sources:
        if key not in DEFAULTS:
            raise unknown_key_error(key, where)
        cfg[key] = check_value(key, value, DEFAULTS[key])
        explicit.add(key)
    return cfg, explicit


# -----------------------------------------------------------------------------
# Model

def is_checkpoint_path(init_from: str) -> bool:
    return init_from.endswith(".pt") or os.path.isfile(init_from) or (
        os.path.isdir(init_from) and not os.path.isfile(os.path.join(init_from, "config.json")))


def checkpoint_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("ckpt_best.pt", "ckpt_last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise TrainError(f"{path} holds no ckpt_best.pt or ckpt_last.pt")
    return path


def build_model(cfg: dict, explicit: set[str], log) -> tuple[GPT, dict | None]:
    """The model init_from asks for, and the checkpoint it came from (None unless a checkpoint)."""
    init = cfg["init_from"]
    model_cfg = {k: cfg[k] for k in MODEL_KEYS}
    try:
        if init == "scratch":
            return GPT(GPTConfig(**model_cfg)), None
        if init == "resume" or is_checkpoint_path(init):
            path = os.path.join(cfg["out_dir"], "ckpt_last.pt") if init == "resume" else checkpoint_file(init)
            if init == "resume" and not os.path.isfile(path):
                raise TrainError(f"init_from='resume' but there is no {path}; start the run with another init_from")
            ckpt = load_checkpoint(path)
            # the checkpoint's architecture, except what the config sets explicitly: a
            # different shape then fails the check in load_checkpoint_weights
            saved = ckpt["model_config"]
            mc = {**saved, **{k: cfg[k] for k in MODEL_KEYS if k in explicit and k != "block_size"}}
            model = GPT(GPTConfig.from_dict(mc))
            model.load_checkpoint_weights(ckpt, source=path)
            log(f"loaded {path} (iteration {ckpt.get('iter_num', '?')}, val loss {ckpt.get('best_val_loss', '?')})")
            return model, ckpt
        # a Hugging Face GPT-2: load dense, then compress the MLPs as the config says
        ignored = sorted(k for k in ARCH_KEYS if k in explicit)
        if ignored:
            log(f"note: init_from={init!r} fixes {', '.join(ignored)}; the config's values are ignored")
        model = GPT.from_pretrained(init, dropout=cfg["dropout"])
        if cfg["mlp"] != "dense" or cfg.get("compress_targets"):
            accepted = inspect.signature(compress).parameters      # fields added to compress() flow through
            kwargs = {k: cfg[k] for k in MODEL_KEYS if k in accepted}
            model, report = compress(model, **kwargs)
            log(f"compressed {init} with " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
            log(format_report(report))
        return model, None
    except TrainError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise TrainError(f"could not build the model for init_from={init!r}: {e}") from e


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 2 per multiply-add forward, 4 backward (nanoGPT's 6N + 12LdT),
    Kronecker and low-rank layers counted by the multiply-adds they really run."""
    return 6.0 * model.macs_per_token(seq_len)


def peak_flops(cfg: dict, device: torch.device) -> float | None:
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"]
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 312e12)


def configure_optimizer(model: GPT, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights (and Kronecker factors unless decay_factors=False),
    none on biases, LayerNorms and Kronecker scalars."""
    factors = {id(p) for m in model.modules() if isinstance(m, KronLinear) for p in (m.A, m.B)}
    decay, no_decay = [], []
    for p in model.parameters():                           # a tied tensor is yielded once
        if not p.requires_grad:
            continue
        if id(p) in factors:
            (decay if cfg["decay_factors"] else no_decay).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


def get_lr(it: int, cfg: dict) -> float:
    """Linear warm-up over warmup_iters, then cosine from learning_rate to min_lr at lr_decay_iters."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


# -----------------------------------------------------------------------------
# Devices, DDP

def pick_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device, log) -> str:
    if name not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype={name!r}; choose bfloat16, float16 or float32")
    if device.type != "cuda" and name != "float32":
        log(f"note: dtype={name} is for CUDA; running float32 on {device.type}")
        return "float32"
    if name == "bfloat16" and not torch.cuda.is_bf16_supported():
        log("note: this GPU has no bfloat16; using float16 with a GradScaler")
        return "float16"
    return name


def download(url: str, path: str, log) -> str:
    """Fetch url to path (atomically) unless it is there already; a clear error when offline."""
    if not os.path.isfile(path):
        import urllib.request
        log(f"downloading {url} -> {path}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            urllib.request.urlretrieve(url, path + ".tmp")
        except OSError as e:
            raise TrainError(f"could not download {url} ({e}); put the file at {path} yourself, "
                             "or set data_prepare's dataset to a local text file") from e
        os.replace(path + ".tmp", path)
    return path


def prepare_data(cfg: dict, master: bool, ddp: bool, log) -> TokenData:
    """TokenData of data_dir; prepares it first (on rank 0) when data_prepare says how and it is missing."""
    data_dir = cfg["data_dir"]
    if cfg["data_prepare"] and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        if master:
            import prepare_owt
            kwargs = dict(cfg["data_prepare"])
            url = kwargs.pop("url", None)                          # where to fetch a missing local source
            source = kwargs.get("dataset", prepare_owt.OWT)
            if not os.path.exists(source) and os.path.exists(os.path.join(REPO, source)):
                kwargs["dataset"] = os.path.join(REPO, source)     # paths in configs are relative to the repo
            elif not os.path.exists(source) and url:
                kwargs["dataset"] = download(url, os.path.join(data_dir, os.path.basename(source)), log)
            log(f"{data_dir} is not prepared yet; preparing it from {kwargs.get('dataset')}")
            try:
                prepare_owt.prepare(out=data_dir, **kwargs)
            except prepare_owt.PrepareError as e:
                raise TrainError(str(e)) from e
            except TypeError as e:                                # a wrong key in data_prepare
                raise ConfigError(f"data_prepare={cfg['data_prepare']!r}: {e}") from e
        if ddp:
            torch.distributed.barrier()
    return TokenData(data_dir)


# -----------------------------------------------------------------------------
# Training

@torch.no_grad()
def estimate_loss(model: nn.Module, data: TokenData, cfg: dict, ctx, device: torch.device) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation
    (their own generator), so evaluations compare like with like and never touch the training RNG."""
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    model.eval()
    out = {}
    for split in ("train", "val"):
        offsets = data.sample_offsets(split, cfg["block_size"], (cfg["eval_iters"], cfg["batch_size"]), gen)
        total = torch.zeros((), device=device)
        for k in range(cfg["eval_iters"]):
            X, Y = data.batch(split, offsets[k], cfg["block_size"], device)
            with ctx:
                _, loss = model(X, Y)
            total += loss.float()
        out[split] = (total / cfg["eval_iters"]).item()
    model.train()
    return out


def train(cfg: dict, explicit: set[str] | None = None) -> dict:
    """Run training as `cfg` says (a dict of every key of DEFAULTS, e.g. from resolve_config).

    Returns {"losses": train loss of each step run (global mean over processes),
    "iters": their iteration numbers, "evals": [{"iter", "train", "val"}], "best_val_loss",
    "iter_num", "model": the trained (unwrapped) model}."""
    explicit = set(cfg) if explicit is None else explicit
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, None, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = pick_device(cfg["device"], local_rank)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        result = _train(cfg, explicit, device, ddp, rank, world, master, log)
        if ddp:
            # free the DDP wrapper now, while the interpreter is whole: its reducer holds gloo work
            # objects with tensors, whose destruction at interpreter exit aborted a rank (SIGABRT,
            # "terminate called without an active exception", in 3 of 12 full test runs); then
            # wait for every rank (rank 0 may still be writing its checkpoint) before the teardown
            gc.collect()
            torch.distributed.barrier()
        return result
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def _train(cfg, explicit, device, ddp, rank, world, master, log) -> dict:
    accum_total, B, T = cfg["gradient_accumulation_steps"], cfg["batch_size"], cfg["block_size"]
    if accum_total % world:
        raise ConfigError(
            f"gradient_accumulation_steps={accum_total} must be divisible by the {world} processes; keep the "
            f"sequences per step ({accum_total * B}) with e.g. --gradient_accumulation_steps={world} "
            f"--batch_size={max(1, accum_total * B // world)}")
    accum = accum_total // world                 # micro-steps of this process
    dtype = pick_dtype(cfg["dtype"], device, log)
    cfg = {**cfg, "dtype_used": dtype, "world_size": world}
    log("resolved config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()))
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.manual_seed(cfg["seed"] + rank)        # model init (scratch) and dropout
    data_gen = torch.Generator().manual_seed(cfg["seed"])   # batch sampling, the same on every rank

    data = prepare_data(cfg, master, ddp, log)
    data.check_block_size(T)
    raw_model, ckpt = build_model(cfg, explicit, log)
    if T > raw_model.config.block_size:
        raise ConfigError(f"block_size={T} is longer than the model's context {raw_model.config.block_size}")
    raw_model.to(device)
    log(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(include_wpe=False):,} without "
        f"position embeddings), mlp={raw_model.config.mlp}, kron_shape={raw_model.config.kron_shape}")

    optimizer = configure_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    iter_num, best_val_loss = 0, float("inf")
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        data_gen.set_state(ckpt["data_rng"])
        if world == 1 and "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"])
        else:
            torch.manual_seed(cfg["seed"] + rank + iter_num)
        log(f"resuming at iteration {iter_num}, best val loss {best_val_loss:.4f}")
    del ckpt

    model = raw_model
    if cfg["compile"]:
        log("compiling the model (torch.compile)...")
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))

    wandb_run = None
    if cfg["wandb_log"] and master:
        import wandb
        wandb_run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None,
                               config=cfg, dir=cfg["out_dir"], mode=cfg["wandb_mode"] or None)

    tokens_per_iter = accum_total * B * T
    flops_tok, peak = flops_per_token(raw_model, T), peak_flops(cfg, device)
    log(f"tokens per iteration: {tokens_per_iter:,} ({accum_total} micro-steps x {B} x {T}, {world} process(es)); "
        f"{flops_tok / 1e9:.3f} GFLOPs per token")

    def save(evals: dict, improved: bool, rng_state: torch.Tensor) -> None:
        extra = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                     best_val_loss=best_val_loss, val_loss=evals["val"], train_loss=evals["train"],
                     config=cfg, data_rng=rng_state, torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        last = os.path.join(cfg["out_dir"], "ckpt_last.pt")
        best = os.path.join(cfg["out_dir"], "ckpt_best.pt")
        if cfg["always_save_checkpoint"] or improved:
            raw_model.save_checkpoint(last, **extra)
            log(f"saved {last}")
        if improved:
            tmp = best + ".tmp"
            shutil.copyfile(last, tmp)
            os.replace(tmp, best)                              # atomic, like save_checkpoint
            log(f"saved {best} (val loss {best_val_loss:.4f})")

    def flush(pending: list[torch.Tensor]) -> list[float]:
        """The pending step losses as floats (one host sync), averaged over processes; stop on NaN/inf."""
        vals = torch.stack(pending).float()
        if ddp:
            torch.distributed.all_reduce(vals)
            vals /= world
        out = vals.tolist()
        pending.clear()
        for i, v in enumerate(out):
            if not math.isfinite(v):
                raise TrainingDiverged(
                    f"the training loss became {v} at iteration {iter_num - len(out) + i + 1}; stopping. "
                    f"The last good checkpoints in {cfg['out_dir']} are kept (this state is not saved). "
                    f"Lower learning_rate (now {cfg['learning_rate']:g}), check grad_clip, or use dtype=bfloat16 "
                    "instead of float16, then resume with init_from='resume'.")
        return out

    result = {"losses": [], "iters": [], "evals": [], "best_val_loss": best_val_loss}

    def draw_offsets() -> torch.Tensor:
        # the whole step's batch is drawn on every rank; each rank takes its own micro-steps
        offs = data.sample_offsets("train", T, (accum_total, B), data_gen)      # (accum_total, B)
        return offs[rank * accum:(rank + 1) * accum]                            # (accum, B)

    def evaluate() -> dict[str, float]:
        losses = estimate_loss(model, data, cfg, ctx, device)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(
                f"the evaluation loss became {losses['val']} (val) / {losses['train']} (train) at iteration "
                f"{iter_num}; stopping without saving. The last good checkpoints in {cfg['out_dir']} are kept. "
                f"Lower learning_rate (now {cfg['learning_rate']:g}) and resume with init_from='resume'.")
        log(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        result["evals"].append({"iter": iter_num, **losses})
        if wandb_run:
            wandb_run.log({"iter": iter_num, "train/eval_loss": losses["train"], "val/loss": losses["val"]})
        return losses

    if cfg["eval_at_start"] and iter_num == 0 and cfg["eval_iters"] > 0:
        evaluate()

    rng_state = data_gen.get_state()             # the data RNG before drawing the next step's batch
    offsets = draw_offsets()
    X, Y = data.batch("train", offsets[0], T, device)
    pending: list[torch.Tensor] = []
    t_last, it_last = time.time(), iter_num
    while iter_num < cfg["max_iters"]:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            if ddp:  # all-reduce the gradients only after the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / accum
            # prefetch the next micro-batch while the device works on this one
            if micro + 1 < accum:
                X, Y = data.batch("train", offsets[micro + 1], T, device)
            else:
                rng_state = data_gen.get_state()
                offsets = draw_offsets()
                X, Y = data.batch("train", offsets[0], T, device)
            loss_sum += loss.detach().float()
            scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        pending.append(loss_sum)

        is_eval = iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]
        if iter_num % cfg["log_interval"] == 0 or is_eval:
            first = iter_num - len(pending) + 1
            losses = flush(pending)                     # the only host sync of the training steps
            result["losses"] += losses
            result["iters"] += list(range(first, iter_num + 1))
            now = time.time()
            dt = (now - t_last) / max(1, iter_num - it_last)
            t_last, it_last = now, iter_num
            tok_s = tokens_per_iter / dt
            mfu = f"{100 * flops_tok * tok_s / peak:.1f}%" if peak else "n/a"
            log(f"iter {iter_num}: loss {losses[-1]:.4f}, lr {lr:.3e}, {dt * 1000:.0f} ms/step, "
                f"{tok_s:,.0f} tok/s, MFU {mfu}")
            if wandb_run:
                wandb_run.log({"iter": iter_num, "train/loss": losses[-1], "lr": lr, "tok_per_s": tok_s,
                               "step_ms": dt * 1000})
        if is_eval and cfg["eval_iters"] > 0:
            losses = evaluate()
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if master:
                save(losses, improved, rng_state)
            t_last = time.time()                          # do not count evaluation as step time
    if wandb_run:
        wandb_run.finish()
    result.update(best_val_loss=best_val_loss, iter_num=iter_num, model=raw_model)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`python train.py CONFIG [--key=value ...]` in-process; returns train()'s result."""
    keys = "\n".join(f"  {k} = {v!r}" for k, v in DEFAULTS.items())
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__, epilog="keys and their defaults:\n" + keys)
    p.add_argument("config", nargs="?", help="config file (Python assignments), e.g. configs/krony81m.py")
    p.add_argument("overrides", nargs="*", metavar="--key=value", help="override a config key")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        p.parse_args(["--help"])
    config = argv.pop(0) if argv and not argv[0].startswith("-") else None
    overrides = argv                                   # each checked by parse_override
    cfg, explicit = resolve_config(config, overrides)
    return train(cfg, explicit)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (TrainError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the last checkpoint is intact (resume with --init_from=resume)")
