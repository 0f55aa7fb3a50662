"""
The whole GPT in one file: config, attention, block, pluggable MLP (dense or
Kronecker-factored), weight tying, loading GPT-2 checkpoints, compression,
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
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from kronecker import INITS, KronLinear

MLP_KINDS = ("dense", "kron")
# Hugging Face names that from_pretrained downloads (everything else must be a local directory).
HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


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
    # MLP: "dense" (GPT-2) or "kron" (W = sum_i s_i A_i (x) B_i, Krony-PT)
    mlp: str = "dense"
    kron_shape: Optional[tuple] = None  # shape (m1, n1) of A for c_fc (4*n_embd, n_embd); c_proj uses (n1, m1)
    kron_factors: int = 1               # k
    kron_scalars: bool = False          # one trained scalar s_i per factor
    kron_init: str = "vl-norm"          # vl | vl-norm | prune | random (used when compressing dense weights)

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kron_shape"] = list(self.kron_shape) if self.kron_shape is not None else None
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

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
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


def make_mlp_linear(config: GPTConfig, in_features: int, out_features: int) -> nn.Module:
    """The MLP's linear layers: dense, or Kronecker with A (m1, n1) for c_fc and (n1, m1) for c_proj."""
    if config.mlp == "dense":
        return nn.Linear(in_features, out_features, bias=config.bias)
    m1, n1 = config.kron_shape
    a_shape = (m1, n1) if out_features > in_features else (n1, m1)
    return KronLinear(in_features, out_features, a_shape, config.kron_factors,
                      bias=config.bias, scalars=config.kron_scalars)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = make_mlp_linear(config, config.n_embd, 4 * config.n_embd)
        self.c_proj = make_mlp_linear(config, 4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's activation is the tanh approximation of GELU ("gelu_new")
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
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
        """Any model a user can name: a checkpoint file (*.pt) or a directory holding
        ckpt_best.pt / ckpt_last.pt, a local Hugging Face directory, or a hub name."""
        if os.path.isfile(spec):
            return cls.from_checkpoint(spec)
        if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
            for name in ("ckpt_best.pt", "ckpt_last.pt", "ckpt.pt"):
                if os.path.isfile(os.path.join(spec, name)):
                    return cls.from_checkpoint(os.path.join(spec, name))
            raise FileNotFoundError(f"{spec} holds neither config.json (Hugging Face layout) "
                                    "nor ckpt_best.pt / ckpt_last.pt")
        return cls.from_pretrained(spec, **overrides)

    # --------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens tokens. temperature=0 is greedy.

        With the KV cache each new token costs one position. When the context
        reaches block_size, the cache is rebuilt from the last block_size // 2
        tokens (a sliding window), so generation can run past block_size."""
        cache = None
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
    name: str               # "c_fc" or "c_proj"
    rel_error: float        # ||W - W_hat||_F / ||W||_F
    retained_norm: float    # 100 * ||W_hat||_F / ||W||_F


def compress(model: GPT, mlp: str = "kron", kron_shape: tuple | None = None, kron_factors: int = 1,
             kron_scalars: bool = False, kron_init: str = "vl-norm", svd: str = "exact",
             verbose: bool = False) -> tuple[GPT, list[LayerReport]]:
    """A new GPT whose MLP weights are Kronecker factors initialised from `model`'s
    dense weights (attention, embeddings, LayerNorms and MLP biases copied).
    Returns the model and a per-layer report (paper Table 4 view)."""
    if any(not isinstance(m, nn.Linear) for b in model.transformer.h for m in (b.mlp.c_fc, b.mlp.c_proj)):
        raise ValueError("compress() needs a model with dense MLPs (load the dense GPT-2 first)")
    config = GPTConfig(**{**asdict(model.config), "mlp": mlp, "kron_shape": kron_shape,
                          "kron_factors": kron_factors, "kron_scalars": kron_scalars, "kron_init": kron_init})
    new = GPT(config).to(model.lm_head.weight.device)
    # Copy everything that is not an MLP weight; the MLP weights become factors below.
    sd = {k: v for k, v in model.state_dict().items() if ".mlp.c_" not in k or k.endswith(".bias")}
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and all(".mlp.c_" in k for k in missing), (missing, unexpected)
    report = []
    if mlp != "dense":
        for i, (old, blk) in enumerate(zip(model.transformer.h, new.transformer.h)):
            for name in ("c_fc", "c_proj"):
                dense, kron = getattr(old.mlp, name), getattr(blk.mlp, name)
                kron.init_from_weight(dense.weight.detach(), kron_init, svd)
                with torch.no_grad():
                    W, W_hat = dense.weight.float(), kron.materialize().float()
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

def resolve_hf_dir(name_or_dir: str) -> str:
    """A local directory with config.json and weights, downloading hub models if needed."""
    if os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "config.json")):
            raise FileNotFoundError(f"{name_or_dir} has no config.json; a Hugging Face GPT-2 directory "
                                    "holds config.json and model.safetensors or pytorch_model.bin")
        return name_or_dir
    if name_or_dir not in HF_MODELS and (os.sep in name_or_dir or name_or_dir.startswith(".")):
        raise FileNotFoundError(f"no such directory or checkpoint: {name_or_dir}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    repo = "openai-community/" + name_or_dir if name_or_dir.startswith("gpt2") else \
        ("distilbert/distilgpt2" if name_or_dir == "distilgpt2" else name_or_dir)
    try:
        cfg = hf_hub_download(repo, "config.json")
        try:
            hf_hub_download(repo, "model.safetensors")
        except EntryNotFoundError:
            hf_hub_download(repo, "pytorch_model.bin")
    except Exception as e:  # offline, unknown repo, ...
        raise RuntimeError(
            f"could not download {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Pass a local directory in Hugging Face layout instead (config.json plus "
            "model.safetensors or pytorch_model.bin), e.g. one written by "
            "transformers' save_pretrained or `huggingface-cli download openai-community/gpt2 --local-dir gpt2`."
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
