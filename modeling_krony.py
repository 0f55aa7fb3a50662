"""
The modeling file of a compact Krony export (`python export_hf.py --compact`): export_hf.py copies
this file into the export directory, where transformers runs it for

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

It needs torch and transformers only (it runs without this repository). The model is transformers'
own GPT2LMHeadModel (attention, KV cache, generate, tied embeddings) whose compressed linears are
swapped for small factored modules, so the file stores the factors, not the dense weights:

- "kron":    W = sum_i s_i A_i (x) B_i, A (k, m1, n1), B (k, m2, n2), optional scalars s (k,), plus an
             optional sparse residual S (values at flat positions row * in + col, int32)
- "lowrank": W = U V, U (out, r), V (r, in)
- "shared":  W = C basis, C (out, r), basis (r, in) shared by a group of layers (stored once)

config.json lists each compressed linear under krony_layers: {"3": {"mlp.c_fc": {"method": "kron",
"a_shape": [1536, 384], "b_shape": [2, 2], "k": 1, "scalars": false, "sparse_nnz": 0}}}; a linear
that is not listed stays a dense Conv1D, as in GPT-2. Every module computes y = x W^T + b with the
weight in nn.Linear's (out, in) layout, W's rows and columns in the standard order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP
from transformers.pytorch_utils import Conv1D


class KronyGPT2Config(GPT2Config):
    model_type = "krony_gpt2"

    def __init__(self, krony_layers: dict | None = None, krony_bases: list | None = None, **kwargs):
        super().__init__(**kwargs)
        self.krony_layers = krony_layers or {}        # {"layer": {"mlp.c_fc": spec, ...}}
        self.krony_bases = krony_bases or []          # [[rank, in_features], ...] of the shared bases


class KronLinear(nn.Module):
    """y = x W^T + b, W = sum_i s_i A_i (x) B_i (+ S), applied as two small products: W is never built."""

    def __init__(self, in_features: int, out_features: int, spec: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        k, (m1, n1), (m2, n2) = spec["k"], spec["a_shape"], spec["b_shape"]
        if (m1 * m2, n1 * n2) != (out_features, in_features):
            raise ValueError(f"A {spec['a_shape']} (x) B {spec['b_shape']} is not a ({out_features}, {in_features}) weight")
        self.a_shape, self.b_shape = (m1, n1), (m2, n2)
        self.A = nn.Parameter(torch.zeros(k, m1, n1))
        self.B = nn.Parameter(torch.zeros(k, m2, n2))
        self.scalars = nn.Parameter(torch.ones(k)) if spec.get("scalars") else None
        self.bias = nn.Parameter(torch.zeros(out_features))
        nnz = spec.get("sparse_nnz", 0)
        self.sparse_values = nn.Parameter(torch.zeros(nnz)) if nnz else None
        if nnz:
            self.register_buffer("sparse_index", torch.zeros(nnz, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        k, N = self.A.shape[0], x.numel() // self.in_features
        B = self.B if self.scalars is None else self.B * self.scalars.view(-1, 1, 1)
        # per row, Y = sum_i A_i X B_i^T with X the input as (n1, n2), row-major (feature c * n2 + d).
        # A first: one GEMM reads A once for all rows and factors; the factors are stacked along
        # its output, then along the reduction of the product with B (which sums them)
        Xt = x.reshape(N, n1, n2).transpose(1, 2).contiguous()             # (N, n2, n1)
        U = Xt @ self.A.reshape(k * m1, n1).t()                            # (N, n2, k*m1)
        U = U.view(N, n2, k, m1).permute(0, 3, 2, 1).reshape(N, m1, k * n2)
        Y = U @ B.permute(0, 2, 1).reshape(k * n2, m2)                     # (N, m1, m2): row a * m2 + b
        y = Y.reshape(N, self.out_features) + self.bias
        if self.sparse_values is not None:
            index = self.sparse_index.long()
            S = torch.sparse_coo_tensor(torch.stack([index // self.in_features, index % self.in_features]),
                                        self.sparse_values.to(x.dtype), (self.out_features, self.in_features),
                                        is_coalesced=True, check_invariants=False)   # written sorted
            y = y + torch.sparse.mm(S, x.reshape(-1, self.in_features).t()).t()
        return y.view(*x.shape[:-1], self.out_features)


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b."""

    def __init__(self, in_features: int, out_features: int, spec: dict):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(out_features, spec["rank"]))
        self.V = nn.Parameter(torch.zeros(spec["rank"], in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.V), self.U, self.bias)


class SharedBasisLinear(nn.Module):
    """y = (x basis^T) C^T + b, the basis one of the model's krony_bases (several layers read it)."""

    def __init__(self, in_features: int, out_features: int, spec: dict, bases: nn.ParameterList):
        super().__init__()
        # a plain attribute, not a submodule: the bases are stored once, under the model's krony_bases
        object.__setattr__(self, "bases", bases)
        self.basis_index = spec["basis"]
        self.coefficient = nn.Parameter(torch.zeros(out_features, spec["rank"]))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = self.bases[self.basis_index]
        return nn.functional.linear(nn.functional.linear(x, basis), self.coefficient, self.bias)


class KronyGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = KronyGPT2Config

    def __init__(self, config: KronyGPT2Config):
        super().__init__(config)
        self.krony_bases = nn.ParameterList([nn.Parameter(torch.zeros(r, n)) for r, n in config.krony_bases])
        for layer, linears in config.krony_layers.items():
            block = self.transformer.h[int(layer)]
            for name, spec in linears.items():
                parent_name, child = name.split(".")
                parent = getattr(block, parent_name)
                in_features, out_features = getattr(parent, child).weight.shape     # Conv1D: (in, out)
                setattr(parent, child, self._factored(spec, in_features, out_features))
        self.post_init()

    def _factored(self, spec: dict, in_features: int, out_features: int) -> nn.Module:
        if spec["method"] == "kron":
            return KronLinear(in_features, out_features, spec)
        if spec["method"] == "lowrank":
            return LowRankLinear(in_features, out_features, spec)
        if spec["method"] == "shared":
            return SharedBasisLinear(in_features, out_features, spec, self.krony_bases)
        raise ValueError(f"unknown compressed layer method {spec['method']!r}")

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's init rescales c_proj.weight, which a factored c_proj does not have; the factors
        # themselves always come from the checkpoint
        if isinstance(module, (GPT2Attention, GPT2MLP)) and not isinstance(module.c_proj, Conv1D):
            return
        if isinstance(module, (KronLinear, LowRankLinear, SharedBasisLinear)):
            return
        super()._init_weights(module)


__all__ = ["KronyGPT2Config", "KronyGPT2LMHeadModel"]
