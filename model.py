"""
The whole GPT in one file: the config, which linear layers are compressed and how (one registry
of methods), attention, MLP, block, the GPT itself with weight tying, compression of a dense
GPT-2, loading GPT-2 checkpoints and our own, and generation with a KV cache.

References: GPT-2 (Radford et al. 2019), nanoGPT, Krony-PT (Ben Ayad, Mitrovic, Granitzer).
The Kronecker math lives in kronecker.py, the low-rank layers in lowrank.py.
"""
from __future__ import annotations

import json
import math
import os
from copy import deepcopy
from dataclasses import asdict, dataclass, fields, replace
from fnmatch import fnmatchcase
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

import storage
from kronecker import (INITS, PERMUTATION_OBJECTIVES, KronLinear, PermutationTerm, a_shape_for, b_shape_for,
                       frozen_kron_weights, permutation_search, relative_error, swap_hidden_order)
from lowrank import LowRankLinear, SharedBasisLinear, init_shared_group, tie_bases

LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linears of a Block
# the options a compress target may set for its layers; each is also a GPTConfig field (its default)
LINEAR_OPTIONS = ("kron_shape", "kron_b_shape", "kron_factors", "kron_scalars", "kron_init", "kron_sparse",
                  "prune_b_second", "lowrank_rank", "share_group")
# fields that say how a model was initialised, not what it is: a checkpoint may differ in them
INIT_ONLY = ("dropout", "kron_init", "prune_b_second", "kron_permute")
PERMUTE_OPTIONS = (None, "hidden", "hidden+residual")
# the fields that fix every tensor's shape outside the compressed layers
DIMENSIONS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "layer_norm_epsilon")


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
    untied_head: bool = False         # the output matrix a separate copy of wte (KnGPT-2, TQCompressedGPT2)
    # The MLPs: "dense" (GPT-2), "kron" (W = sum_i s_i A_i (x) B_i, Krony-PT), "lowrank" (W = U V)
    # or "shared" (W_l = C_l B, one basis B per group of share_group consecutive layers); see METHODS.
    mlp: str = "dense"
    kron_shape: Optional[tuple] = None    # A (m1, n1) for c_fc (4*n_embd, n_embd); c_proj uses (n1, m1)
    kron_b_shape: Optional[tuple] = None  # or B (m2, n2) for c_fc, the same at any width; c_proj uses (n2, m2)
    kron_factors: int = 1                 # k
    kron_scalars: bool = False            # one trained scalar s_i per factor
    kron_init: str = "vl-norm"            # vl | vl-norm | prune | random (when compressing dense weights)
    kron_sparse: float = 0.0              # p: also keep the largest fraction p of W - W_hat, sparse
    prune_b_second: float = 0.1           # prune's B = [1, prune_b_second] (the original code used 0)
    kron_permute: Optional[str] = None    # None | "hidden" | "hidden+residual": free permutations first
    lowrank_rank: Optional[int] = None    # rank r of "lowrank", basis size of "shared"
    share_group: int = 2                  # "shared": consecutive (selected) layers per basis
    # Which linears to compress, and how: a list of dicts such as
    # {"pattern": "mlp.c_fc", "layers": "odd", "method": "kron", "kron_shape": [1536, 384]}, the first
    # that selects a layer wins; the mlp / kron_* / lowrank_* fields above are the implicit last
    # target (every MLP), and attention stays dense unless a target says otherwise.
    compress_targets: tuple = ()

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        self.kron_shape = _pair(self.kron_shape, "kron_shape", "")
        self.kron_b_shape = _pair(self.kron_b_shape, "kron_b_shape", "")
        if self.kron_permute not in PERMUTE_OPTIONS:
            raise ValueError(f"kron_permute={self.kron_permute!r}; choose None, 'hidden' or 'hidden+residual'")
        if isinstance(self.compress_targets, str):     # from a command line: JSON
            self.compress_targets = json.loads(self.compress_targets)
        self.compress_targets = tuple(check_target(t, self, f"target {t.get('pattern')!r}: " if isinstance(t, dict)
                                                   else "") for t in self.compress_targets or ())
        # the paper's setup: every MLP by the fields above (checked like any target)
        implicit = {"pattern": "mlp.*", "layers": "all", "method": self.mlp}    # options: the fields above
        self.targets = self.compress_targets + (check_target(implicit, self, where=""),)
        if self.kron_permute and not any(t["method"] == "kron" and t["kron_init"] in PERMUTATION_OBJECTIVES
                                         and fnmatchcase("mlp.c_fc", t["pattern"]) for t in self.targets):
            raise ValueError(f"kron_permute={self.kron_permute!r} reorders the MLPs for a Van Loan init: it needs "
                             "Kronecker MLPs with kron_init 'vl' or 'vl-norm'")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("kron_shape", "kron_b_shape"):
            d[key] = list(d[key]) if d[key] is not None else None
        d["compress_targets"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in t.items()}
                                 for t in self.compress_targets]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def architecture(config: GPTConfig) -> dict:
    """What a model is, as a dict: the config without the fields that say how it was initialised
    (two configs with equal architectures hold the same tensors)."""
    d = config.to_dict()
    for key in INIT_ONLY:
        d.pop(key)
    d["compress_targets"] = [{k: v for k, v in t.items() if k not in INIT_ONLY} for t in d["compress_targets"]]
    return d


# -----------------------------------------------------------------------------
# Compression methods: how one linear layer of a Block is built, and set from the dense weight it
# replaces. Adding a method means writing its layer and its init, and one entry in METHODS.

@dataclass(frozen=True)
class Method:
    build: Callable[[dict, int, int, bool], nn.Module]    # (spec, in_features, out_features, bias) -> layer
    init: Optional[Callable[[nn.Module, torch.Tensor, dict], None]] = None   # (layer, dense W (out, in), spec)
    requires: tuple = ()                                   # options that must be set
    # layers that share tensors (one basis per group) are set together instead: (layers, weights)
    init_group: Optional[Callable[[list, list], None]] = None


def kron_a_shape(spec: dict, out_features: int, in_features: int) -> tuple[int, int]:
    """The A shape of a Kronecker layer (out, in): kron_shape is A for the out >= in orientation
    (c_fc), kron_b_shape is B for it; the other orientation (c_proj) uses them transposed."""
    wide = out_features >= in_features
    if spec["kron_shape"] is not None:
        m1, n1 = spec["kron_shape"]
        return (m1, n1) if wide else (n1, m1)
    m2, n2 = spec["kron_b_shape"]
    return a_shape_for((out_features, in_features), (m2, n2) if wide else (n2, m2), spec["kron_factors"])


def build_kron(spec: dict, in_features: int, out_features: int, bias: bool) -> KronLinear:
    return KronLinear(in_features, out_features, kron_a_shape(spec, out_features, in_features),
                      spec["kron_factors"], bias=bias, scalars=spec["kron_scalars"], sparse=spec["kron_sparse"])


def init_kron(layer: KronLinear, W: torch.Tensor, spec: dict) -> None:
    # random: the spread of the dense layer it replaces
    layer.init_from_weight(W, spec["kron_init"], spec["svd"], prune_b_second=spec["prune_b_second"],
                           random_std=W.float().std().item())


METHODS = {
    "dense": Method(build=lambda spec, i, o, bias: nn.Linear(i, o, bias=bias)),
    "kron": Method(build=build_kron, init=init_kron),
    "lowrank": Method(build=lambda spec, i, o, bias: LowRankLinear(i, o, spec["lowrank_rank"], bias=bias),
                      init=lambda layer, W, spec: layer.init_from_weight(W), requires=("lowrank_rank",)),
    "shared": Method(build=lambda spec, i, o, bias: SharedBasisLinear(i, o, spec["lowrank_rank"], bias=bias),
                     init_group=init_shared_group, requires=("lowrank_rank",)),
}
MLP_KINDS = tuple(METHODS)


def linear_shapes(config: GPTConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of a Block."""
    d = config.n_embd
    return {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}


def _pair(value, key: str, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) < 1 or any(float(v) != int(v) for v in value):
        raise ValueError(f"{where}{key}={value!r} must be a pair of positive integers, e.g. (2, 2)")
    return pair


def check_target(t: dict, config: GPTConfig, where: str = "") -> dict:
    """A compress target with every key filled in (options default to the config's fields), checked:
    the one place where compression settings are validated, against the model's matrix shapes too.

    pattern: a glob over LINEAR_NAMES ("mlp.c_fc", "attn.*", ...); layers: "all", "odd" (h.1, h.3, ...,
    as KnGPT-2 / TQCompressedGPT2), "even" or a list of layer indices; method: a key of METHODS;
    plus any of LINEAR_OPTIONS. `where` starts every error message ("" for the config's own fields)."""
    if not isinstance(t, dict):
        raise ValueError(f"a compress target is a dict like {{'pattern': 'mlp.c_fc', 'layers': 'odd', "
                         f"'method': 'kron', 'kron_shape': [1536, 384]}}, got {t!r}")
    unknown = set(t) - {"pattern", "layers", "method", *LINEAR_OPTIONS}
    if unknown:
        raise ValueError(f"unknown compress target keys {sorted(unknown)}; known: pattern, layers, method, "
                         + ", ".join(LINEAR_OPTIONS))
    pattern = t.get("pattern", "")
    names = [n for n in LINEAR_NAMES if fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f"target pattern {pattern!r} selects none of {', '.join(LINEAR_NAMES)} (globs like 'mlp.*' work)")
    layers = t.get("layers", "all")
    if isinstance(layers, str):
        if layers not in ("all", "odd", "even"):
            raise ValueError(f"target layers {layers!r}: use 'all', 'odd', 'even' or a list of layer indices")
    else:
        layers = tuple(sorted(int(i) for i in layers))
        if any(not 0 <= i < config.n_layer for i in layers):
            raise ValueError(f"target layers {list(layers)}: indices must be in 0..{config.n_layer - 1}")
    method = t.get("method")
    if method not in METHODS:
        what = "mlp" if not where else f"{where}method"
        raise ValueError(f"unknown {what} {method!r}; choose one of {MLP_KINDS}")
    spec = {"pattern": pattern, "layers": layers, "method": method}
    # a target that sets one of the two shape keys does not inherit the other from the config
    own_shape = t.get("kron_shape") is not None or t.get("kron_b_shape") is not None
    for k in LINEAR_OPTIONS:
        inherit = not (own_shape and k in ("kron_shape", "kron_b_shape"))
        spec[k] = t[k] if k in t else (getattr(config, k) if inherit else None)
    spec["kron_shape"] = _pair(spec["kron_shape"], "kron_shape", where)
    spec["kron_b_shape"] = _pair(spec["kron_b_shape"], "kron_b_shape", where)
    for k in METHODS[method].requires:
        if not spec[k]:
            raise ValueError(f"{where}method {method!r} needs {k}" + (
                "; `python lowrank.py plan-rank` gives the rank matching a Kronecker size" if k == "lowrank_rank" else ""))
    if spec["lowrank_rank"] is not None and (not isinstance(spec["lowrank_rank"], int) or spec["lowrank_rank"] < 1):
        raise ValueError(f"{where}lowrank_rank={spec['lowrank_rank']!r} must be a positive integer")
    if not isinstance(spec["share_group"], int) or spec["share_group"] < 1:
        raise ValueError(f"{where}share_group={spec['share_group']!r} must be a positive integer")
    if not isinstance(spec["kron_factors"], int) or spec["kron_factors"] < 1:
        raise ValueError(f"{where}kron_factors={spec['kron_factors']!r} must be a positive integer")
    if spec["kron_init"] not in INITS:
        raise ValueError(f"{where}unknown kron_init {spec['kron_init']!r}; choose one of {', '.join(INITS)}")
    if not 0.0 <= spec["kron_sparse"] <= 1.0:
        raise ValueError(f"{where}kron_sparse={spec['kron_sparse']} must be a fraction in [0, 1]")
    if method == "kron":
        d = config.n_embd
        if spec["kron_shape"] is None and spec["kron_b_shape"] is None:
            raise ValueError(f"{where}{'method' if where else 'mlp'}='kron' needs kron_shape=(m1, n1), the shape of A for c_fc ({4 * d}, {d}), "
                             "or kron_b_shape=(m2, n2), the shape of B; see `python kronecker.py plan`")
        if spec["kron_shape"] is not None and spec["kron_b_shape"] is not None:
            raise ValueError(f"{where}set only one of kron_shape={spec['kron_shape']} (A) and "
                             f"kron_b_shape={spec['kron_b_shape']} (B): each fixes the other")
        shapes = linear_shapes(config)
        for name in names:                      # every matrix this target selects must tile
            out_f, in_f = shapes[name]
            a = kron_a_shape(spec, out_f, in_f)
            b = b_shape_for((out_f, in_f), a, spec["kron_factors"])
            if spec["kron_init"] == "prune" and (spec["kron_factors"] != 1 or b not in ((2, 1), (1, 2))):
                raise ValueError(f"{where}kron_init='prune' needs one factor with B of shape (2, 1) or (1, 2) "
                                 f"(kron_b_shape=(2, 1) or (1, 2)); {name} gets A {a}, B {b}, k={spec['kron_factors']}")
    return spec


def selected_layers(layers, n_layer: int) -> list[int]:
    if layers == "all":
        return list(range(n_layer))
    if layers in ("odd", "even"):
        return list(range(1 if layers == "odd" else 0, n_layer, 2))
    return list(layers)


def linear_spec(config: GPTConfig, layer: int, name: str) -> dict:
    """How the linear `name` (one of LINEAR_NAMES) of block `layer` is built: the first target that
    selects it (the implicit MLP target last), else dense."""
    for t in config.targets:
        if fnmatchcase(name, t["pattern"]) and layer in selected_layers(t["layers"], config.n_layer):
            return t
    return {"method": "dense"}


def make_linear(config: GPTConfig, layer: int, name: str, in_features: int, out_features: int) -> nn.Module:
    """Every linear layer of a Block, built by the method linear_spec gives it."""
    spec = linear_spec(config, layer, name)
    return METHODS[spec["method"]].build(spec, in_features, out_features, config.bias)


def shared_groups(config: GPTConfig) -> list[list[tuple[int, str]]]:
    """(layer, name) groups that share one basis: the layers a "shared" target selects for one
    name, in order, cut into runs of share_group."""
    members: dict[tuple, list[int]] = {}
    for layer in range(config.n_layer):
        for name in LINEAR_NAMES:
            spec = linear_spec(config, layer, name)
            if spec["method"] == "shared":
                members.setdefault((name, config.targets.index(spec), spec["share_group"]), []).append(layer)
    return [[(layer, name) for layer in layers[i:i + g]]
            for (name, _, g), layers in members.items() for i in range(0, len(layers), g)]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a layer applies: factors multiplied out, plus a Kronecker layer's
    sparse residual (for reports and exports; forward never does this)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    W = layer.materialize()
    sparse = getattr(layer, "sparse", None)
    return W if sparse is None else W + sparse.to_dense().to(W.dtype)


# -----------------------------------------------------------------------------
# The transformer

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


def init_weights(module: nn.Module, std: float) -> None:
    """A fresh random init of one module: embeddings and dense weights normal(std), factored layers
    through their init_random(std) (the spread of their product), biases zero."""
    if isinstance(module, nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=std)
    elif hasattr(module, "init_random"):
        module.init_random(std)
    else:
        return
    if getattr(module, "bias", None) is not None:
        torch.nn.init.zeros_(module.bias)


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
        if not config.untied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        for group in shared_groups(config):  # cross-layer basis sharing: one basis tensor per group, likewise
            tie_bases([self.transformer.h[layer].get_submodule(name) for layer, name in group])
        # GPT-2's init: normal(0.02), zero biases, and the residual projections (c_proj) scaled by
        # 1/sqrt(2 n_layer). A factored layer gets factors whose product has that spread, whatever
        # its number of factors (factors of std 0.02 each would leave the product near 4e-4: no MLP).
        for name, module in self.named_modules():
            init_weights(module, 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj") else 0.02)

    def num_params(self, include_wpe: bool = True, include_head: bool = True) -> int:
        """Parameter count as in the paper: a tied embedding / output matrix counted once.
        include_head=False leaves out an untied output matrix (the KnGPT-2 / TQCompressedGPT2
        convention, their '119M*'); a tied one is the embedding and always counted."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if not include_wpe:
            n -= self.transformer.wpe.weight.numel()
        if not include_head and self.config.untied_head:
            n -= self.lm_head.weight.numel()
        return n

    def macs_per_token(self, seq_len: int | None = None) -> int:
        """Forward multiply-adds per token: every linear layer (compressed ones by the
        path they run), the lm_head, and attention's QK^T and AV over seq_len positions.
        Training costs about 3x this (the backward pass twice the forward): FLOPs = 6 x MACs."""
        T = seq_len or self.config.block_size
        linears = sum(m.in_features * m.out_features if isinstance(m, nn.Linear) else m.macs_per_row()
                      for m in self.modules() if isinstance(m, nn.Linear) or hasattr(m, "macs_per_row"))
        return linears + 2 * self.config.n_layer * self.config.n_embd * T

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      every_block: bool = False) -> list[torch.Tensor]:
        """The residual stream (B, T, n_embd) after the last block, or after every block: [h_1, ..., h_L].

        With a KVCache, idx holds only the new tokens; they take positions cache.pos.. ."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        states = []
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
            if every_block:
                states.append(x)
        if cache is not None:
            cache.pos += T
        return states if every_block else [x]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, vocab), loss (mean cross-entropy, targets -1 ignored;
        targets of any memory layout). return_hidden=True adds a third output: the residual stream
        after every block (for intermediate-layer distillation)."""
        hidden = self.hidden_states(idx, cache, every_block=return_hidden)
        logits = self.lm_head(self.transformer.ln_f(hidden[-1]))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """GPT-2 from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
        distilgpt2, owner/name) or a local directory in Hugging Face layout, through
        huggingface_hub + safetensors. dropout and untied_head may be overridden; compression
        overrides (mlp="kron", kron_shape=..., kron_factors, kron_scalars, kron_init, ...: any
        GPTConfig field) compress the dense model after loading (see compress)."""
        directory = resolve_hf_dir(name_or_dir)
        model = cls(hf_config(directory, name_or_dir))
        model.load_hf_state_dict(read_hf_weights(directory), source=name_or_dir)
        rebuild = {k: overrides.pop(k) for k in ("dropout", "untied_head") if k in overrides}
        if rebuild:
            model = model.rebuilt(**rebuild)
        if overrides:
            model, _ = compress(model, **overrides)
        return model

    def rebuilt(self, **changes) -> "GPT":
        """A copy with config fields changed that keep every tensor (dropout, untied_head; an
        untied output matrix starts as a copy of the embedding)."""
        new = GPT(replace(self.config, **changes)).to(self.lm_head.weight.device)
        new.load_state_dict(self.state_dict())
        return new

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a GPT-2 state dict in Hugging Face naming (with or without the
        'transformer.' prefix, Conv1D (in, out) weights) into this dense model."""
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = dict(self.named_parameters())            # a tied tensor appears once, as transformer.wte.weight
        filled = set()
        for key, tensor in sd.items():
            name = key[len("transformer."):] if key.startswith("transformer.") else key
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers
            if name == "lm_head.weight":
                if not self.config.untied_head:
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

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str, **extra) -> None:
        """Save weights + model config (+ anything in `extra`, e.g. optimizer state) as one
        torch.save dict, atomically (storage.save_torch: a crash never leaves half a file)."""
        storage.save_torch({"model": self.state_dict(), "model_config": self.config.to_dict(), **extra}, path)

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu") -> "GPT":
        return cls.from_checkpoint_dict(load_checkpoint(path, map_location), source=path)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, source: str = "checkpoint") -> "GPT":
        """The model of a loaded checkpoint, built with the architecture it was saved with."""
        model = cls(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_checkpoint_weights(ckpt, source=source)
        return model

    def load_checkpoint_weights(self, ckpt: dict, source: str = "checkpoint") -> None:
        """Load ckpt['model'] after checking that it was saved with this model's architecture."""
        saved = ckpt.get("model_config")
        if saved is not None:  # normalised, so fields added since it was saved take their defaults
            saved, mine = architecture(GPTConfig.from_dict(saved)), architecture(self.config)
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            if diff:
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
# Compression: dense GPT -> compressed GPT

@dataclass
class LayerReport:
    layer: int
    name: str               # "mlp.c_fc", "mlp.c_proj", "attn.c_proj", ...
    rel_error: float        # ||W - W_hat||_F / ||W||_F  (W_hat includes a sparse residual)
    retained_norm: float    # 100 * ||W_hat||_F / ||W||_F
    # with kron_permute: the same two without the permutation, for comparison
    rel_error_unpermuted: Optional[float] = None
    retained_norm_unpermuted: Optional[float] = None


def compress(model: GPT, config: GPTConfig | None = None, *, svd: str = "exact", verbose: bool = False,
             **changes) -> tuple[GPT, list[LayerReport]]:
    """A new GPT of `config` (or of model.config with `changes`, e.g. mlp="kron", kron_shape=(1536, 384))
    whose compressed linear layers are initialised from `model`'s dense weights, each by its method's
    init; everything else (embeddings, LayerNorms, biases, layers left dense) is copied bit-identically.
    With `changes` and no mlp, mlp is "kron" (or "dense" when compress_targets are given).
    Returns the model and a per-layer report (the paper's Table 4 view)."""
    if config is None:
        changes.setdefault("mlp", "dense" if changes.get("compress_targets") else "kron")
        config = replace(model.config, **changes)
    elif changes:
        raise ValueError("compress() takes a config or field changes, not both")
    changed = [k for k in DIMENSIONS if getattr(config, k) != getattr(model.config, k)]
    if changed:
        raise ValueError(f"compress(): the config must keep the model's dimensions; it changes {changed}")
    device = model.lm_head.weight.device
    source = permuted(model, config, svd) if config.kron_permute else model
    new = GPT(config).to(device)
    # Copy every tensor the two models share by name and shape; what is left are the compressed layers
    # (an untied output matrix takes the source's, which for a tied source is the embedding).
    new_sd = new.state_dict()
    sd = {k: v for k, v in source.state_dict().items() if k in new_sd and v.shape == new_sd[k].shape}
    new.load_state_dict(sd, strict=False)
    groups: dict[int, tuple[Method, list, list]] = {}
    with torch.no_grad():
        for i, (old, blk) in enumerate(zip(source.transformer.h, new.transformer.h)):
            for name in LINEAR_NAMES:
                dense, layer = old.get_submodule(name), blk.get_submodule(name)
                if isinstance(layer, nn.Linear):
                    continue
                if not isinstance(dense, nn.Linear):
                    raise ValueError(f"compress() needs h.{i}.{name} dense in the source model, found "
                                     f"{type(dense).__name__} (load the dense GPT-2 first)")
                spec = {**linear_spec(config, i, name), "svd": svd}
                method = METHODS[spec["method"]]
                W = dense.weight.detach()
                if method.init_group is not None:   # one init per group of layers sharing a tensor
                    _, layers, weights = groups.setdefault(id(layer.basis), (method, [], []))
                    layers.append(layer)
                    weights.append(W)
                else:
                    method.init(layer, W, spec)
        for method, layers, weights in groups.values():
            method.init_group(layers, weights)
    report = compression_report(source, new)
    if config.kron_permute:     # the same layers initialised without the permutation, for comparison
        plain = compression_report(model, compress(model, replace(config, kron_permute=None), svd=svd)[0])
        for r, p in zip(report, plain):
            r.rel_error_unpermuted, r.retained_norm_unpermuted = p.rel_error, p.retained_norm
    if verbose:
        print(format_report(report))
    return new, report


@torch.no_grad()
def compression_report(dense: GPT, compressed: GPT) -> list[LayerReport]:
    """Relative error and retained norm of every compressed linear against the dense one."""
    report = []
    for i, (old, blk) in enumerate(zip(dense.transformer.h, compressed.transformer.h)):
        for name in LINEAR_NAMES:
            layer = blk.get_submodule(name)
            if isinstance(layer, nn.Linear):
                continue
            W, W_hat = old.get_submodule(name).weight.float(), dense_weight(layer).float()
            report.append(LayerReport(i, name, ((W - W_hat).norm() / W.norm()).item(),
                                      100 * (W_hat.norm() / W.norm()).item()))
    return report


def format_report(report: list[LayerReport]) -> str:
    permuted_too = any(r.rel_error_unpermuted is not None for r in report)
    head = "| layer | matrix | rel. Frobenius error | retained norm % |"
    lines = [head + (" error without permutation | retained without |" if permuted_too else ""),
             "|---|---|---|---|" + ("---|---|" if permuted_too else "")]
    for r in report:
        line = f"| {r.layer} | {r.name} | {r.rel_error:.4f} | {r.retained_norm:.2f} |"
        if permuted_too:
            line += f" {r.rel_error_unpermuted:.4f} | {r.retained_norm_unpermuted:.2f} |"
        lines.append(line)
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Free permutations before Van Loan: the same dense model, reordered where that costs nothing

@dataclass
class Permutations:
    """Orders for a dense GPT: one per MLP's hidden units, one for the residual stream."""
    hidden: list[torch.Tensor]
    residual: torch.Tensor


def _reorder_(t: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    """t's entries along dim in the order perm, in place (the same tensor object: ties follow)."""
    if t is not None:
        t.copy_(t.index_select(dim, perm.to(t.device)))


def _dense_linears(model: GPT, names=LINEAR_NAMES) -> list[nn.Linear]:
    layers = [block.get_submodule(n) for block in model.transformer.h for n in names]
    if not all(isinstance(m, nn.Linear) for m in layers):
        raise ValueError("permutations are applied to a dense GPT, before compressing it")
    return layers


def _check_perm(perm: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """perm as a LongTensor, if it holds each of 0..n-1 once (anything else would not be free)."""
    perm = torch.as_tensor(perm).cpu()
    if perm.shape != (n,) or perm.is_floating_point() or not torch.equal(perm.sort().values, torch.arange(n)):
        raise ValueError(f"a {what} permutation must hold each of 0..{n - 1} once, got a {perm.dtype} "
                         f"tensor of shape {tuple(perm.shape)}")
    return perm.long()


@torch.no_grad()
def permute_hidden_(model: GPT, layer: int, perm: torch.Tensor) -> None:
    """Reorder one MLP's hidden units: rows of c_fc and its bias, columns of c_proj. The
    function is unchanged (GELU acts on each unit alone)."""
    n_layer = len(model.transformer.h)
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{n_layer - 1}")
    mlp = model.transformer.h[layer].mlp
    _dense_linears(model, ("mlp.c_fc", "mlp.c_proj"))
    perm = _check_perm(perm, mlp.c_fc.weight.shape[0], f"layer {layer}'s hidden")
    _reorder_(mlp.c_fc.weight, perm, 0)
    _reorder_(mlp.c_fc.bias, perm, 0)
    _reorder_(mlp.c_proj.weight, perm, 1)


@torch.no_grad()
def permute_residual_(model: GPT, perm: torch.Tensor) -> None:
    """Reorder the residual-stream features of every layer at once: what writes to the stream
    (embeddings, attn.c_proj, mlp.c_proj: output rows and biases), what reads it (c_attn, c_fc:
    input columns, the output matrix) and every LayerNorm. The function is unchanged (a LayerNorm's
    mean and variance do not depend on the order)."""
    t = model.transformer
    _dense_linears(model)
    perm = _check_perm(perm, t.wte.weight.shape[1], "residual")
    _reorder_(t.wte.weight, perm, 1)
    if model.lm_head.weight is not t.wte.weight:
        _reorder_(model.lm_head.weight, perm, 1)
    _reorder_(t.wpe.weight, perm, 1)
    for norm in [t.ln_f] + [ln for block in t.h for ln in (block.ln_1, block.ln_2)]:
        _reorder_(norm.weight, perm, 0)
        _reorder_(norm.bias, perm, 0)
    for block in t.h:
        for reader in (block.attn.c_attn, block.mlp.c_fc):
            _reorder_(reader.weight, perm, 1)
        for writer in (block.attn.c_proj, block.mlp.c_proj):
            _reorder_(writer.weight, perm, 0)
            _reorder_(writer.bias, perm, 0)


def permutation_terms(model: GPT, config: GPTConfig, hidden_of: int | None) -> list[PermutationTerm]:
    """The matrices a search lowers the error of: the Kronecker MLP matrices `config` initialises
    with Van Loan, of layer `hidden_of` (its hidden units: c_fc's rows, c_proj's columns) or of
    every layer (the residual stream: c_fc's columns, c_proj's rows)."""
    terms = []
    layers = range(config.n_layer) if hidden_of is None else [hidden_of]
    for i in layers:
        for name, hidden_axis in (("mlp.c_fc", 0), ("mlp.c_proj", 1)):
            spec = linear_spec(config, i, name)
            if spec["method"] != "kron" or spec["kron_init"] not in PERMUTATION_OBJECTIVES:
                continue
            W = model.transformer.h[i].get_submodule(name).weight.detach().float()
            a = kron_a_shape(spec, *W.shape)
            b = b_shape_for(tuple(W.shape), a, spec["kron_factors"])
            axis = hidden_axis if hidden_of is not None else 1 - hidden_axis
            terms.append(PermutationTerm(W, a, b, axis, spec["kron_factors"], spec["kron_init"]))
    return terms


def search_permutations(model: GPT, config: GPTConfig, residual: bool, svd: str = "exact",
                        max_rounds: int = 10, tol: float = 1e-4) -> Permutations:
    """Orders for every MLP's hidden units (and, with residual, the residual stream) that lower the
    summed Van Loan error of the Kronecker MLP matrices `config` asks for. The hidden and residual
    searches alternate, each from the order the other left, while the sum drops by more than tol
    (relative); the first round runs the one that gains more first (an order found while the other
    axis is still shuffled would hide the structure from it). `model` is not changed."""
    return _search_permutations_(deepcopy(model), config, residual, svd, max_rounds, tol)


def _search_permutations_(work: GPT, config: GPTConfig, residual: bool, svd: str = "exact",
                          max_rounds: int = 10, tol: float = 1e-4) -> Permutations:
    """search_permutations on `work` itself: it ends permuted by the orders returned."""
    n = config.n_layer
    found = Permutations([torch.arange(4 * config.n_embd) for _ in range(n)], torch.arange(config.n_embd))

    def total() -> float:
        return sum(relative_error(t.W, t.a_shape, t.k, t.objective, svd)
                   for i in range(n) for t in permutation_terms(work, config, i))

    def hidden(structured: bool) -> tuple[float, list]:
        results = [permutation_search(terms, structured, svd) if terms else None
                   for terms in (permutation_terms(work, config, i) for i in range(n))]
        return sum(r.total_before - r.total_after for r in results if r), results

    def apply_hidden(results) -> None:
        for i, r in enumerate(results):
            if r is not None:
                permute_hidden_(work, i, r.perm)
                found.hidden[i] = found.hidden[i][r.perm]

    def search_residual(structured: bool):
        terms = permutation_terms(work, config, None)
        return permutation_search(terms, structured, svd) if terms else None

    def apply_residual(r) -> None:
        if r is not None:
            permute_residual_(work, r.perm)
            found.residual = found.residual[r.perm]

    current = total()
    for round in range(max_rounds):
        start = current
        if round == 0 and residual:
            gain, results = hidden(True)
            res = search_residual(True)
            if res is not None and res.total_before - res.total_after > gain:
                apply_residual(res)
                apply_hidden(hidden(True)[1])
            else:
                apply_hidden(results)
                apply_residual(search_residual(True))
        else:
            apply_hidden(hidden(round == 0)[1])
            if residual:
                apply_residual(search_residual(False))
        current = total()
        if current >= start * (1 - tol):
            break
    return found


def permuted(model: GPT, config: GPTConfig, svd: str = "exact") -> GPT:
    """A copy of the dense `model` with its MLP hidden units (and, for kron_permute="hidden+residual",
    its residual stream) reordered so that the Van Loan approximations `config` asks for lose less.
    The same function: the permutations are free, at init and at run time."""
    new = deepcopy(model)
    _search_permutations_(new, config, residual=config.kron_permute == "hidden+residual", svd=svd)
    return new


# -----------------------------------------------------------------------------
# Files: what a user names as a model, the hub, Hugging Face directories, checkpoints

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
    raise FileNotFoundError(f"no such directory or checkpoint: {spec!r} (no such file or directory, and no hub "
                            f"name); a model is {MODEL_KINDS_HELP}")


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


def source_config(spec: str) -> GPTConfig | None:
    """The architecture of the model `spec` names, read without its weights (None for a hub model
    that is not downloaded yet); FileNotFoundError when it names nothing."""
    source = resolve_model(spec)
    if source.kind == "checkpoint":
        ckpt = load_checkpoint(source.path, mmap=True)
        return GPTConfig.from_dict(ckpt["model_config"])
    if source.kind == "hf_dir":
        return hf_config(source.path, spec)
    return None


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
