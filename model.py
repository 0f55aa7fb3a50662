"""
The dense GPT-2, in one file: config, attention, MLP, block, the model with weight tying, its
hidden states, generation with a KV cache, and parameter and multiply-add counts.

Compression is applied to a model built here, afterwards (compress.py swaps its linear layers,
the way gpt-fast's quantize.py does), so nothing in this file knows about Kronecker factors.
Loading GPT-2 from the hub and our checkpoints is checkpoints.py's job.

References: GPT-2 (Radford et al. 2019), nanoGPT, Krony-PT (Ben Ayad, Mitrovic, Granitzer).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# the linear layers of a Block, by the names compression selects them with
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class GPTConfig:
    block_size: int = 1024            # context length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768                 # width of the residual stream
    dropout: float = 0.0
    bias: bool = True                 # biases in Linears and LayerNorms, as GPT-2
    layer_norm_epsilon: float = 1e-5
    untied_head: bool = False         # the output matrix a separate copy of wte (KnGPT-2, TQCompressedGPT2)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear of a Block."""
        d = self.n_embd
        return {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}


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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)   # q, k, v
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


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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


def init_std(name: str, n_layer: int) -> float:
    """GPT-2's init spread of the linear layer `name`: 0.02, and 0.02 / sqrt(2 n_layer) for the
    residual projections (c_proj), whose outputs add up along the residual stream."""
    return 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02


def init_weights(module: nn.Module, std: float) -> None:
    """A fresh random init of one module: embeddings and dense weights normal(std), biases zero.
    A layer that is not an nn.Linear (a compressed one) brings its own init_random(std): factors
    whose product has that spread."""
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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        for name, module in self.named_modules():
            init_weights(module, init_std(name, config.n_layer))

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
        """Forward multiply-adds per token: every linear layer (a compressed one by its own
        macs_per_row), the lm_head, and attention's QK^T and AV over seq_len positions.
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

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """GPT-2 from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2,
        owner/name) or a local directory in Hugging Face layout. dropout and untied_head may be
        overridden; compression options (mlp="kron", kron_shape=(1536, 384), kron_init, ...)
        compress the loaded model. A shortcut for checkpoints.from_pretrained, kept here because
        users call it by this name: the loaders and compression sit above this file, so it is
        imported when called, not when model.py is."""
        from checkpoints import from_pretrained
        return from_pretrained(name_or_dir, **overrides)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens tokens. temperature=0 is greedy.

        With the KV cache each new token costs one position. When the context
        reaches block_size, the cache is rebuilt from the last block_size // 2
        tokens (a sliding window), so generation can run past block_size. A layer
        that builds its weight on every call (a compressed one may) and offers
        frozen() builds it once for the whole generation instead."""
        cache = None
        with contextlib.ExitStack() as stack:
            for m in self.modules():
                if hasattr(m, "frozen"):
                    stack.enter_context(m.frozen())
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
