"""
Files: what a user names as a model, the Hugging Face hub and its directories, our checkpoints
and the files of a run directory. Every script loads and saves models through here.

A checkpoint is one torch.save dict: "model" (the state dict), "model_config" (the dense GPT's
dimensions, model.GPTConfig) and "compression" (every compression key, compress.KEYS), plus what
training adds (optimizer, iteration, config, ...). Checkpoints written before the compression had
its own entry kept every key in "model_config"; they load the same.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace

import torch

import storage
from compress import KEYS, Compression, architecture, build, compress, resolve, spec_of
from model import GPT, GPTConfig

# Hub names from_pretrained knows (any "owner/name" repository id works too) and their repositories.
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
               "distilgpt2": "distilbert/distilgpt2"}
HF_MODELS = tuple(HUB_ALIASES)
# their dimensions (n_layer, n_head, n_embd), known before anything is downloaded so that a config's
# factor shapes are checked first
HUB_DIMENSIONS = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                  "gpt2-xl": (48, 25, 1600), "distilgpt2": (6, 12, 768)}
# what a run directory holds, in the order a model is taken from it
CKPT_BEST, CKPT_LAST, RUN_JSON = "ckpt_best.pt", "ckpt_last.pt", "run.json"
CHECKPOINT_NAMES = (CKPT_BEST, CKPT_LAST, "ckpt.pt")
MODEL_KINDS_HELP = ("a checkpoint file (.pt), a run directory (its ckpt_best.pt or ckpt_last.pt), "
                    "a local Hugging Face directory (config.json + model.safetensors or pytorch_model.bin), "
                    f"or a hub name ({', '.join(HF_MODELS)} or owner/name)")


@dataclass(frozen=True)
class ModelSource:
    """What a user named as a model, resolved: kind is "checkpoint" (path: the .pt file),
    "hf_dir" (path: a local Hugging Face directory) or "hub" (path: the hub repository id)."""
    kind: str
    path: str
    spec: str


def resolve_model(spec: str) -> ModelSource:
    """The one rule for every script: an existing file is a checkpoint; an existing directory is
    a Hugging Face directory if it holds config.json, else a run directory (CHECKPOINT_NAMES in
    order); a name that is no path is a hub name. Nothing is downloaded here.
    Raises FileNotFoundError naming what was tried."""
    spec = str(spec)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return ModelSource("checkpoint", path, spec)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf_dir", path, spec)
        for name in CHECKPOINT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return ModelSource("checkpoint", os.path.join(path, name), spec)
        raise FileNotFoundError(f"{spec} is a directory but holds no model: neither a run's "
                                f"{' / '.join(CHECKPOINT_NAMES[:2])} nor a Hugging Face config.json")
    if spec in HUB_ALIASES:
        return ModelSource("hub", HUB_ALIASES[spec], spec)
    first = spec.split("/")[0]
    repo_id = (spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not os.path.exists(first)
               and not spec.endswith((".pt", ".bin", ".safetensors", ".json")) and all(spec.split("/")))
    if repo_id:
        return ModelSource("hub", spec, spec)
    raise FileNotFoundError(f"no such directory or checkpoint: {spec!r} (no such file or directory, and no hub "
                            f"name); a model is {MODEL_KINDS_HELP}")


def resolve_hf_dir(name_or_dir: str) -> str:
    """A local directory with config.json and weights, downloading a hub model if needed."""
    source = resolve_model(name_or_dir)
    if source.kind == "checkpoint":
        raise ValueError(f"{name_or_dir} is one of our checkpoints, not a Hugging Face model; "
                         "load it with checkpoints.load_model")
    if source.kind == "hf_dir":
        return source.path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        cfg = hf_hub_download(source.path, "config.json")
        try:
            hf_hub_download(source.path, "model.safetensors")
        except EntryNotFoundError:
            hf_hub_download(source.path, "pytorch_model.bin")
    except Exception as e:  # offline, unknown repo, ...
        raise RuntimeError(
            f"{name_or_dir!r} is no local file or directory, and downloading it from the Hugging Face hub "
            f"({source.path}) failed ({type(e).__name__}: {str(e)[:300]}). Offline? Pass a local directory in "
            "Hugging Face layout instead (config.json plus model.safetensors or pytorch_model.bin), e.g. one "
            "written by `huggingface-cli download openai-community/gpt2 --local-dir gpt2` on a machine with network."
        ) from e
    return os.path.dirname(cfg)


def hf_config(directory: str, name: str = "") -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 directory (its config.json)."""
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{name or directory}: activation_function={act!r} is not GPT-2's tanh GELU")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                     untied_head=not hf.get("tie_word_embeddings", True))


def read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    st = os.path.join(directory, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    pt = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint dict, or one clear error: missing, unreadable (truncated, corrupt), or not ours.
    mmap=True maps the tensors instead of reading them (cheap when only the metadata is needed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = storage.load_torch(path, map_location=map_location, mmap=mmap)   # checksum verified; CorruptFile
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a Krony checkpoint (no 'model' and 'model_config' entries)")
    return ckpt


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 weights into a dense GPT

@torch.no_grad()
def load_hf_state_dict(model: GPT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a GPT-2 state dict in Hugging Face naming (with or without the 'transformer.' prefix,
    Conv1D (in, out) weights) into the dense `model`; every parameter must be filled."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = dict(model.named_parameters())            # a tied tensor appears once, as transformer.wte.weight
    filled = set()
    for key, tensor in sd.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers
        if name == "lm_head.weight":
            if not model.config.untied_head:
                continue  # tied to wte
            target = name
        else:
            target = "transformer." + name
        if target not in ours:
            raise ValueError(f"{source}: unexpected weight {key!r} of shape {tuple(tensor.shape)}; "
                             "is this a GPT-2 checkpoint?")
        if name.endswith(conv1d):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(ours[target].shape)}")
        ours[target].copy_(tensor)
        filled.add(target)
    missing = sorted(set(ours) - filled)
    if missing:
        raise ValueError(f"{source}: the checkpoint does not fill {len(missing)} parameters, e.g. {missing[:5]}")


def rebuilt(model: GPT, **changes) -> GPT:
    """A copy with GPTConfig fields changed that keep every tensor (dropout, untied_head; an
    untied output matrix starts as a copy of the embedding), compressed as `model` is."""
    new = build(replace(model.config, **changes), spec_of(model)).to(model.lm_head.weight.device)
    new.load_state_dict(model.state_dict())
    return new


def from_pretrained(name_or_dir: str, **overrides) -> GPT:
    """GPT-2 from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2,
    owner/name) or a local directory in Hugging Face layout, through huggingface_hub +
    safetensors. dropout and untied_head may be overridden; compression keys (mlp="kron",
    kron_shape=..., kron_factors, kron_scalars, kron_init, ...) compress the dense model after
    loading (see compress.compress)."""
    directory = resolve_hf_dir(name_or_dir)
    model = GPT(hf_config(directory, name_or_dir))
    load_hf_state_dict(model, read_hf_weights(directory), source=name_or_dir)
    rebuild = {k: overrides.pop(k) for k in ("dropout", "untied_head") if k in overrides}
    if rebuild:
        model = rebuilt(model, **rebuild)
    if overrides:
        model, _ = compress(model, **overrides)
    return model


# -----------------------------------------------------------------------------
# Our checkpoints

def split_config(d: dict, compression: dict | None = None) -> tuple[GPTConfig, dict]:
    """The GPTConfig and compression keys a checkpoint stores ("model_config", "compression"); a
    checkpoint of the older layout, whose model_config held both, is split by key name."""
    dims = {f.name for f in fields(GPTConfig)}
    keys = {k: v for k, v in d.items() if k not in dims}
    unknown = set(keys) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    return GPTConfig.from_dict({k: v for k, v in d.items() if k in dims}), {**keys, **(compression or {})}


def checkpoint_spec(ckpt: dict) -> tuple[GPTConfig, Compression]:
    """The architecture a checkpoint dict was saved with, resolved."""
    config, keys = split_config(ckpt["model_config"], ckpt.get("compression"))
    return config, resolve(config, **keys)


def save_checkpoint(model: GPT, path: str, **extra) -> None:
    """Save weights, dimensions and compression (+ anything in `extra`, e.g. optimizer state) as
    one torch.save dict, atomically (storage.save_torch: a crash never leaves half a file)."""
    storage.save_torch({"model": model.state_dict(), "model_config": model.config.to_dict(),
                        "compression": spec_of(model).keys, **extra}, path)


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> GPT:
    """The model of a loaded checkpoint dict, built with the architecture it was saved with."""
    try:
        config, spec = checkpoint_spec(ckpt)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    model = build(config, spec)
    model.load_state_dict(ckpt["model"])
    return model


def load_weights(model: GPT, ckpt: dict, source: str = "checkpoint") -> None:
    """Load ckpt's weights into `model` after checking that it was saved with its architecture."""
    saved = architecture(*checkpoint_spec(ckpt))
    mine = architecture(model)
    diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
    if diff:
        raise ValueError(f"{source} was saved from another model configuration: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
                         + ". Build the model with the checkpoint's config (checkpoints.from_checkpoint) "
                         "or point to a checkpoint of this configuration.")
    model.load_state_dict(ckpt["model"])


def from_checkpoint(path: str, map_location="cpu") -> GPT:
    return model_from_checkpoint(load_checkpoint(path, map_location), source=path)


def load_model(spec: str, **overrides) -> GPT:
    """Any model a user can name (see resolve_model): a checkpoint file, a run directory, a local
    Hugging Face directory, or a hub name. Overrides compress a dense HF model."""
    source = resolve_model(spec)
    if source.kind == "checkpoint":
        if overrides:
            raise ValueError(f"{spec} is a checkpoint: its architecture is fixed, overrides "
                             f"{sorted(overrides)} do not apply")
        return from_checkpoint(source.path)
    return from_pretrained(spec, **overrides)


def source_spec(spec: str) -> tuple[GPTConfig, dict] | None:
    """The dimensions and compression keys of the model `spec` names, read without its weights
    (None for a hub model that is not downloaded yet); FileNotFoundError when it names nothing."""
    source = resolve_model(spec)
    if source.kind == "checkpoint":
        ckpt = load_checkpoint(source.path, mmap=True)
        return split_config(ckpt["model_config"], ckpt.get("compression"))
    if source.kind == "hf_dir":
        return hf_config(source.path, spec), {}
    if spec in HUB_DIMENSIONS:
        n_layer, n_head, n_embd = HUB_DIMENSIONS[spec]
        return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd), {}
    return None
