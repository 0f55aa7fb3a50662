"""
The whole GPT in one file: config, attention, block, pluggable MLP (dense or
Kronecker-factored; low-rank and shared-basis baselines; any linear layer chosen
by GPTConfig.compress_targets), weight tying, loading GPT-2 checkpoints, compression,
checkpoints and generation with a KV cache.

References: GPT-2 (Radford et al. 2019), nanoGPT, Krony-PT (seeds/001).
The Kronecker math itself lives in kronecker.py.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from fnmatch import fnmatchcase
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from kronecker import INITS, KronLinear, frozen_kron_weights, swap_hidden_order
from lowrank import LowRankLinear, SharedBasisLinear, init_shared_group, tie_bases

MLP_KINDS = ("dense", "kron", "lowrank", "shared")   # also the methods a compress target may use
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linears of a Block
# the per-layer options, as GPTConfig fields; a compress target may set each of them
LINEAR_OPTIONS = ("kron_shape", "kron_factors", "kron_scalars", "kron_init", "kron_sparse",
                  "lowrank_rank", "share_group")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                 # biases in Linears and LayerNorms, as GPT-2
    layer_norm_epsilon: float = 1e-5
    # MLP: "dense" (GPT-2), "kron" (W = sum_i s_i A_i (x) B_i, Krony-PT), "lowrank" (W = U V)
    # or "shared" (W_l = C_l B, one basis B per group of share_group consecutive layers)
    mlp: str = "dense"
    kron_shape: Optional[tuple] = None  # shape (m1, n1) of A for c_fc (4*n_embd, n_embd); c_proj uses (n1, m1)
    kron_factors: int = 1               # k
    kron_scalars: bool = False          # one trained scalar s_i per factor
    kron_init: str = "vl-norm"          # vl | vl-norm | prune | random (used when compressing dense weights)
    kron_sparse: float = 0.0            # p: also keep the largest fraction p of W - W_hat, sparse (seeds/003)
    lowrank_rank: Optional[int] = None  # rank r of "lowrank", basis size of "shared"
    share_group: int = 2                # "shared": consecutive (selected) layers per basis
    # Which linears to compress, and how (see linear_spec): a list of dicts such as
    # {"pattern": "mlp.c_fc", "layers": "odd", "method": "kron", "kron_shape": [1536, 384]}.
    # Empty: the paper's setup, every MLP by `mlp`, attention dense.
    compress_targets: tuple = ()

    def __post_init__(self):
        if self.kron_shape is not None:
            self.kron_shape = tuple(int(s) for s in self.kron_shape)
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp {self.mlp!r}; choose one of {MLP_KINDS}")
        if self.mlp == "kron" and self.kron_shape is None:
            raise ValueError("mlp='kron' needs kron_shape=(m1, n1), the shape of A for c_fc "
                             f"({4 * self.n_embd}, {self.n_embd}); see `python kronecker.py plan`")
        if self.kron_init not in INITS:
            raise ValueError(f"unknown kron_init {self.kron_init!r}; choose one of {', '.join(INITS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.kron_sparse <= 1.0:
            raise ValueError(f"kron_sparse={self.kron_sparse} must be a fraction in [0, 1]")
        if self.mlp in ("lowrank", "shared") and not self.lowrank_rank:
            raise ValueError(f"mlp={self.mlp!r} needs lowrank_rank=r; `python lowrank.py plan-rank` "
                             "gives the rank matching a Kronecker size")
        if isinstance(self.compress_targets, str):     # from a command line: JSON
            self.compress_targets = json.loads(self.compress_targets)
        self.compress_targets = tuple(normalize_target(t, self) for t in self.compress_targets or ())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kron_shape"] = list(self.kron_shape) if self.kron_shape is not None else None
        d["compress_targets"] = [{**t, "kron_shape": list(t["kron_shape"]) if t["kron_shape"] else None,
                                  "layers": t["layers"] if isinstance(t["layers"], str) else list(t["layers"])}
                                 for t in self.compress_targets]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer for generation, preallocated to block_size.

    k[layer], v[layer]: (B, n_head, block_size, head_dim); `pos` is how many
    positions are filled (the same for every layer)."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = make_linear(config, layer, "attn.c_attn", config.n_embd, 3 * config.n_embd)  # q, k, v
        self.c_proj = make_linear(config, layer, "attn.c_proj", config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        is_causal, mask = True, None
        if cache is not None:
            p = cache.pos
            cache.k[layer][:, :, p:p + T] = k
            cache.v[layer][:, :, p:p + T] = v
            k, v = cache.k[layer][:, :, :p + T], cache.v[layer][:, :, :p + T]
            if T == 1:          # one new token sees every cached position
                is_causal = False
            elif p > 0:         # several new tokens after a prefix: causal mask offset by p
                mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
                is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)       # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Which linear layers are compressed, and how: one place decides, make_linear builds

def normalize_target(t: dict, config: GPTConfig) -> dict:
    """A compress target with every key filled in (options default to the config's fields), checked.

    pattern: a glob over LINEAR_NAMES ("mlp.c_fc", "attn.*", ...); layers: "all", "odd"
    (h.1, h.3, ..., as KnGPT-2 / TQCompressedGPT2), "even" or a list of layer indices;
    method: one of MLP_KINDS; plus any of LINEAR_OPTIONS."""
    if not isinstance(t, dict):
        raise ValueError(f"a compress target is a dict like {{'pattern': 'mlp.c_fc', 'layers': 'odd', "
                         f"'method': 'kron', 'kron_shape': [1536, 384]}}, got {t!r}")
    unknown = set(t) - {"pattern", "layers", "method", *LINEAR_OPTIONS}
    if unknown:
        raise ValueError(f"unknown compress target keys {sorted(unknown)}; known: pattern, layers, method, "
                         + ", ".join(LINEAR_OPTIONS))
    pattern = t.get("pattern", "")
    if not any(fnmatchcase(n, pattern) for n in LINEAR_NAMES):
        raise ValueError(f"target pattern {pattern!r} selects none of {', '.join(LINEAR_NAMES)} (globs like 'mlp.*' work)")
    layers = t.get("layers", "all")
    if isinstance(layers, str):
        if layers not in ("all", "odd", "even"):
            raise ValueError(f"target layers {layers!r}: use 'all', 'odd', 'even' or a list of layer indices")
    else:
        layers = tuple(sorted(int(i) for i in layers))
        if any(not 0 <= i < config.n_layer for i in layers):
            raise ValueError(f"target layers {list(layers)}: indices must be in 0..{config.n_layer - 1}")
    spec = {"pattern": pattern, "layers": layers, "method": t.get("method"),
            **{k: t.get(k, getattr(config, k)) for k in LINEAR_OPTIONS}}
    if spec["kron_shape"] is not None:
        spec["kron_shape"] = tuple(int(v) for v in spec["kron_shape"])
    if spec["method"] not in MLP_KINDS:
        raise ValueError(f"target {pattern!r}: method {spec['method']!r}; choose one of {MLP_KINDS}")
    if spec["method"] == "kron" and spec["kron_shape"] is None:
        raise ValueError(f"target {pattern!r}: method 'kron' needs kron_shape (A shape for the out >= in orientation)")
    if spec["method"] in ("lowrank", "shared") and not spec["lowrank_rank"]:
        raise ValueError(f"target {pattern!r}: method {spec['method']!r} needs lowrank_rank")
    if spec["kron_init"] not in INITS:
        raise ValueError(f"target {pattern!r}: unknown kron_init {spec['kron_init']!r}; choose one of {INITS}")
    return spec


def selected_layers(layers, n_layer: int) -> list[int]:
    if layers == "all":
        return list(range(n_layer))
    if layers in ("odd", "even"):
        return list(range(1 if layers == "odd" else 0, n_layer, 2))
    return list(layers)


def linear_spec(config: GPTConfig, layer: int, name: str) -> dict:
    """How the linear `name` (one of LINEAR_NAMES) of block `layer` is built: the first
    compress target that selects it, else the paper's default (MLP by config.mlp, attention dense)."""
    for t in config.compress_targets:
        if fnmatchcase(name, t["pattern"]) and layer in selected_layers(t["layers"], config.n_layer):
            return t
    if name.startswith("mlp."):
        return {"method": config.mlp, **{k: getattr(config, k) for k in LINEAR_OPTIONS}}
    return {"method": "dense"}


def shared_groups(config: GPTConfig) -> list[list[tuple[int, str]]]:
    """(layer, name) groups that share one basis: the layers a "shared" spec selects for one
    name, in order, cut into runs of share_group."""
    members: dict[tuple, list[int]] = {}
    for layer in range(config.n_layer):
        for name in LINEAR_NAMES:
            spec = linear_spec(config, layer, name)
            if spec["method"] == "shared":
                which = config.compress_targets.index(spec) if "pattern" in spec else -1
                members.setdefault((name, which, spec["share_group"]), []).append(layer)
    return [[(layer, name) for layer in layers[i:i + g]]
            for (name, _, g), layers in members.items() for i in range(0, len(layers), g)]


def make_linear(config: GPTConfig, layer: int, name: str, in_features: int, out_features: int) -> nn.Module:
    """Every linear layer of a Block: dense, Kronecker, low-rank or shared-basis, as linear_spec says.
    kron_shape is the A shape when out >= in (c_fc); the transposed matrix (c_proj) uses (n1, m1)."""
    spec = linear_spec(config, layer, name)
    if spec["method"] == "dense":
        return nn.Linear(in_features, out_features, bias=config.bias)
    if spec["method"] == "kron":
        m1, n1 = spec["kron_shape"]
        a_shape = (m1, n1) if out_features >= in_features else (n1, m1)
        return KronLinear(in_features, out_features, a_shape, spec["kron_factors"], bias=config.bias,
                          scalars=spec["kron_scalars"], sparse=spec["kron_sparse"])
    if spec["method"] == "lowrank":
        return LowRankLinear(in_features, out_features, spec["lowrank_rank"], bias=config.bias)
    return SharedBasisLinear(in_features, out_features, spec["lowrank_rank"], bias=config.bias)  # tied in GPT


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight any layer make_linear builds applies: factors multiplied out,
    plus a Kronecker layer's sparse residual (for reports and exports; forward never does this)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    W = layer.materialize()
    sparse = getattr(layer, "sparse", None)
    return W if sparse is None else W + sparse.to_dense().to(W.dtype)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.c_fc = make_linear(config, layer, "mlp.c_fc", config.n_embd, 4 * config.n_embd)
        self.c_proj = make_linear(config, layer, "mlp.c_proj", 4 * config.n_embd, config.n_embd)
        # Kronecker layers of B 3x3 or 2x2 pass the hidden features in the order their factors
        # compute them in, which saves two strided copies of the hidden activation per layer
        swap_hidden_order(self.c_fc, self.c_proj)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's activation is the tanh approximation of GELU ("gelu_new")
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config, layer)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        for group in shared_groups(config):  # cross-layer basis sharing: one basis tensor per group, likewise
            tie_bases([self.transformer.h[layer].get_submodule(name) for layer, name in group])
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("c_proj.A") or name.endswith("c_proj.B"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, include_wpe: bool = True) -> int:
        """Parameter count as in the paper: the tied embedding counted once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n if include_wpe else n - self.transformer.wpe.weight.numel()

    def macs_per_token(self, seq_len: int | None = None) -> int:
        """Forward multiply-adds per token: every linear layer (compressed ones by the
        path they run), the lm_head, and attention's QK^T and AV over seq_len positions.
        Training costs about 3x this (the backward pass twice the forward): FLOPs = 6 x MACs."""
        T = seq_len or self.config.block_size
        linears = sum(m.in_features * m.out_features if isinstance(m, nn.Linear) else m.macs_per_row()
                      for m in self.modules() if isinstance(m, nn.Linear) or hasattr(m, "macs_per_row"))
        return linears + 2 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab), loss (mean cross-entropy, targets -1 ignored).

        With a KVCache, idx holds only the new tokens; they take positions cache.pos.. ."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """GPT-2 from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
        distilgpt2) or a local directory in Hugging Face layout, through
        huggingface_hub + safetensors. Kronecker overrides (mlp="kron",
        kron_shape=..., kron_factors, kron_scalars, kron_init) compress the MLPs
        after loading; dropout may be overridden too."""
        directory = resolve_hf_dir(name_or_dir)
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_dir}: activation_function={act!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config)
        model.load_hf_state_dict(read_hf_weights(directory), source=name_or_dir)
        dropout = overrides.pop("dropout", None)
        if dropout is not None:
            model = cls._with_dropout(model, dropout)
        if overrides:
            model, _ = compress(model, **overrides)
        return model

    @classmethod
    def _with_dropout(cls, model: "GPT", dropout: float) -> "GPT":
        config = GPTConfig(**{**asdict(model.config), "dropout": dropout})
        new = cls(config)
        new.load_state_dict(model.state_dict())
        return new

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a GPT-2 state dict in Hugging Face naming (with or without the
        'transformer.' prefix, Conv1D (in, out) weights) into this dense model."""
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = dict(self.named_parameters())            # the tied tensor appears once, as transformer.wte.weight
        filled = set()
        for key, tensor in sd.items():
            name = key[len("transformer."):] if key.startswith("transformer.") else key
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers; lm_head is tied to wte
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

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str, **extra) -> None:
        """Save weights + model config (+ anything in `extra`, e.g. optimizer state)
        as one torch.save dict, atomically: a temp file in the same directory, then rename."""
        ckpt = {"model": self.state_dict(), "model_config": self.config.to_dict(), **extra}
        save_atomic(ckpt, path)

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu") -> "GPT":
        ckpt = load_checkpoint(path, map_location)
        model = cls(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_checkpoint_weights(ckpt, source=path)
        return model

    def load_checkpoint_weights(self, ckpt: dict, source: str = "checkpoint") -> None:
        """Load ckpt['model'] after checking that it was saved with this model's config."""
        saved = ckpt.get("model_config")
        if saved is not None:  # normalised, so fields added since it was saved take their defaults
            saved = GPTConfig.from_dict(saved).to_dict()
        mine = self.config.to_dict()
        arch = lambda d: {k: v for k, v in d.items() if k not in ("dropout", "kron_init")}
        if saved is not None and arch(saved) != arch(mine):
            diff = {k: (saved.get(k), mine.get(k)) for k in arch(mine) if saved.get(k) != mine.get(k)}
            raise ValueError(f"{source} was saved from another model configuration: "
                             + ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
                             + ". Build the model with the checkpoint's config (GPT.from_checkpoint) "
                             "or point to a checkpoint of this configuration.")
        self.load_state_dict(ckpt["model"])

    @classmethod
    def load(cls, spec: str, **overrides) -> "GPT":
        """Any model a user can name (see resolve_model): a checkpoint file, a run directory,
        a local Hugging Face directory, or a hub name. Overrides compress a dense HF model."""
        source = resolve_model(spec)
        if source.kind == "checkpoint":
            if overrides:
                raise ValueError(f"{spec} is a checkpoint: its architecture is fixed, overrides "
                                 f"{sorted(overrides)} do not apply")
            return cls.from_checkpoint(source.path)
        return cls.from_pretrained(spec, **overrides)

    # --------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens tokens. temperature=0 is greedy.

        With the KV cache each new token costs one position. When the context
        reaches block_size, the cache is rebuilt from the last block_size // 2
        tokens (a sliding window), so generation can run past block_size. Kronecker
        layers that run on a materialised weight build it once, not once per token."""
        cache = None
        with frozen_kron_weights(self):
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits, _ = self(idx[:, -self.config.block_size:])
                else:
                    if cache is None or cache.pos >= self.config.block_size:
                        keep = idx[:, -self.config.block_size:] if cache is None \
                            else idx[:, -(self.config.block_size // 2):]
                        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
                        logits, _ = self(keep, cache=cache)
                    else:
                        logits, _ = self(idx[:, -1:], cache=cache)
                idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat((idx, idx_next), dim=1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, vocab): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p      # keep the smallest set reaching top_p
        sorted_logits[drop] = -float("inf")
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# -----------------------------------------------------------------------------
# Compression: dense GPT -> Kronecker GPT

@dataclass
class LayerReport:
    layer: int
    name: str               # "mlp.c_fc", "mlp.c_proj", "attn.c_proj", ...
    rel_error: float        # ||W - W_hat||_F / ||W||_F  (W_hat includes a sparse residual)
    retained_norm: float    # 100 * ||W_hat||_F / ||W||_F


def compress(model: GPT, mlp: str | None = None, kron_shape: tuple | None = None, kron_factors: int = 1,
             kron_scalars: bool = False, kron_init: str = "vl-norm", kron_sparse: float = 0.0,
             lowrank_rank: int | None = None, share_group: int = 2, compress_targets=(),
             svd: str = "exact", verbose: bool = False) -> tuple[GPT, list[LayerReport]]:
    """A new GPT whose selected linear layers (every MLP by `mlp`, or what compress_targets
    select) are initialised from `model`'s dense weights; everything else (embeddings,
    LayerNorms, biases, untouched linears) is copied bit-identically. mlp defaults to
    "kron", or "dense" when compress_targets are given. Returns the model and a
    per-layer report (paper Table 4 view)."""
    if mlp is None:
        mlp = "dense" if compress_targets else "kron"
    config = GPTConfig(**{**asdict(model.config), "mlp": mlp, "kron_shape": kron_shape,
                          "kron_factors": kron_factors, "kron_scalars": kron_scalars, "kron_init": kron_init,
                          "kron_sparse": kron_sparse, "lowrank_rank": lowrank_rank, "share_group": share_group,
                          "compress_targets": compress_targets})
    new = GPT(config).to(model.lm_head.weight.device)
    # Copy every tensor the two models share by name and shape; what is left are the compressed layers.
    new_sd = new.state_dict()
    sd = {k: v for k, v in model.state_dict().items() if k in new_sd and v.shape == new_sd[k].shape}
    missing, _ = new.load_state_dict(sd, strict=False)
    report, groups = [], {}
    for i, (old, blk) in enumerate(zip(model.transformer.h, new.transformer.h)):
        for name in LINEAR_NAMES:
            dense, layer = old.get_submodule(name), blk.get_submodule(name)
            if isinstance(layer, nn.Linear):
                continue
            if not isinstance(dense, nn.Linear):
                raise ValueError(f"compress() needs h.{i}.{name} dense in the source model, found "
                                 f"{type(dense).__name__} (load the dense GPT-2 first)")
            W = dense.weight.detach()
            if isinstance(layer, KronLinear):
                layer.init_from_weight(W, linear_spec(config, i, name)["kron_init"], svd)
            elif isinstance(layer, LowRankLinear):
                layer.init_from_weight(W)
            else:                              # shared basis: one SVD per group, below
                groups.setdefault(id(layer.basis), []).append((layer, W))
    for members in groups.values():
        init_shared_group([m for m, _ in members], [w for _, w in members])
    assert all(not isinstance(new.get_submodule(k.rsplit(".", 1)[0]), nn.Linear) for k in missing), missing
    with torch.no_grad():
        for i, (old, blk) in enumerate(zip(model.transformer.h, new.transformer.h)):
            for name in LINEAR_NAMES:
                layer = blk.get_submodule(name)
                if isinstance(layer, nn.Linear):
                    continue
                W, W_hat = old.get_submodule(name).weight.float(), dense_weight(layer).float()
                report.append(LayerReport(i, name, ((W - W_hat).norm() / W.norm()).item(),
                                          100 * (W_hat.norm() / W.norm()).item()))
    if verbose:
        print(format_report(report))
    return new, report


def format_report(report: list[LayerReport]) -> str:
    lines = ["| layer | matrix | rel. Frobenius error | retained norm % |", "|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.name} | {r.rel_error:.4f} | {r.retained_norm:.2f} |" for r in report]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Files: the hub, Hugging Face directories, checkpoints

# Hub names from_pretrained knows (any "owner/name" repository id works too) and their repositories.
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
               "distilgpt2": "distilbert/distilgpt2"}
HF_MODELS = tuple(HUB_ALIASES)
# what a run directory holds, in the order a model is taken from it
CHECKPOINT_NAMES = ("ckpt_best.pt", "ckpt_last.pt", "ckpt.pt")
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
    raise FileNotFoundError(f"no such file or directory: {spec!r} (no such directory or checkpoint exists, and it "
                            f"is no hub name); a model is {MODEL_KINDS_HELP}")


def resolve_hf_dir(name_or_dir: str) -> str:
    """A local directory with config.json and weights, downloading a hub model if needed."""
    source = resolve_model(name_or_dir)
    if source.kind == "checkpoint":
        raise ValueError(f"{name_or_dir} is one of our checkpoints, not a Hugging Face model; "
                         "load it with GPT.load / GPT.from_checkpoint")
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


def read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    st = os.path.join(directory, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    pt = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                           "it may be truncated or corrupt: use another one (e.g. ckpt_best.pt)") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a Krony checkpoint (no 'model' entry)")
    return ckpt
