"""
Kronecker factors and the layer built from them:

- the shapes: which A (m1, n1) and B (m2, n2) tile a weight,
- the Van Loan-Pitsianis decomposition  W ~ sum_i A_i (x) B_i  (Frobenius-optimal),
- KronLinear: a linear layer whose weight is sum_i s_i A_i (x) B_i, applied
  without ever materialising the full weight (plus an optional sparse residual),
- the initialisations of the Krony-PT paper (vl, vl-norm, prune, random),
- the fast paths KronLinear takes, chosen by shape,
- the search for free permutations (of hidden units, of the residual stream) that lower the
  Van Loan error before compressing.

`python kronecker.py plan` lists the valid shapes with their model sizes (sizes.py counts them).

Conventions. A weight W has the nn.Linear layout (out, in). With A of shape
(m1, n1) and B of shape (m2, n2), out = m1*m2 and in = n1*n2, and the
Kronecker product is the block matrix whose (i1, j1) block is A[i1, j1] * B:

    (A (x) B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] * B[i2, j2]

which is exactly torch.kron(A, B). Viewing an input vector x of length n1*n2
as an (n1, n2) matrix X (row-major), (A (x) B) x = vec(A X B^T).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment

INITS = ("vl", "vl-norm", "prune", "random")
SVD_METHODS = ("exact", "randomized")


# -----------------------------------------------------------------------------
# Shapes

def shape_pair(shape, what: str = "kron_shape", sides: str = "(m1, n1)") -> tuple[int, int]:
    """`shape` as a pair of ints, or a ValueError naming `what` (kron_shape for A, B shape for B)."""
    try:
        pair = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{what} must be a pair {sides}, got {shape!r}")
    return pair


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_bound(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> int:
    """Most Kronecker factors that can be non-zero: the rank of the rearranged
    (m1*n1, m2*n2) matrix is at most min(m1*n1, m2*n2)."""
    (m1, n1), (m2, n2) = shape_pair(a_shape), shape_pair(b_shape, "B shape", "(m2, n2)")
    return min(m1 * n1, m2 * n2)


def check_factors(a_shape: tuple[int, int], b_shape: tuple[int, int], k: int) -> None:
    """k must be between 1 and the rank bound of A (x) B."""
    if k < 1:
        raise ValueError(f"the number of Kronecker factors must be >= 1, got k={k}")
    bound = rank_bound(a_shape, b_shape)
    if k > bound:
        raise ValueError(
            f"k={k} Kronecker factors of A {a_shape} (x) B {b_shape} is more than the rank bound "
            f"min(m1*n1, m2*n2) = {bound} of the rearranged matrix; choose k in 1..{bound}.")


def other_factor(weight_shape: tuple[int, int], shape: tuple[int, int], which: str = "A") -> tuple[int, int]:
    """The shape of the other factor for a weight of `weight_shape` (out, in) and a factor `which`
    ("A" or "B") of `shape`: (out / rows, in / cols). ValueError, listing the valid sides, if it
    does not tile the weight."""
    out_f, in_f = weight_shape
    i = "1" if which == "A" else "2"
    rows, cols = shape_pair(shape, "kron_shape" if which == "A" else "B shape", f"(m{i}, n{i})")
    if rows <= 0 or cols <= 0 or out_f % rows or in_f % cols:
        raise ValueError(
            f"{which} shape {tuple(shape)} does not tile a weight of shape (out={out_f}, in={in_f}): "
            f"m{i} must divide {out_f} and n{i} must divide {in_f}. "
            f"Valid m{i}: {', '.join(map(str, divisors(out_f)))}. Valid n{i}: {', '.join(map(str, divisors(in_f)))}. "
            f"Run `python kronecker.py plan` to see every valid shape with its size.")
    return out_f // rows, in_f // cols


def b_shape_for(weight_shape: tuple[int, int], a_shape: tuple[int, int], k: int = 1) -> tuple[int, int]:
    """The B shape that goes with `a_shape` for a weight of `weight_shape` (out, in). Raises
    ValueError, listing valid choices, if A does not tile W or if k is larger than the rank
    bound of the rearranged matrix."""
    b = other_factor(weight_shape, a_shape, "A")
    check_factors(shape_pair(a_shape), b, k)
    return b


def a_shape_for(weight_shape: tuple[int, int], b_shape: tuple[int, int], k: int = 1) -> tuple[int, int]:
    """The A shape that goes with `b_shape` (the same checks as b_shape_for)."""
    a = other_factor(weight_shape, b_shape, "B")
    check_factors(a, shape_pair(b_shape, "B shape", "(m2, n2)"), k)
    return a


# -----------------------------------------------------------------------------
# Van Loan decomposition

def vl_rearrange(W: torch.Tensor, a_shape: tuple[int, int]) -> torch.Tensor:
    """R(W): (..., m1*m2, n1*n2) -> (..., m1*n1, m2*n2).

    Each (m2, n2) block of W becomes one row of R(W), so that A (x) B maps to
    the rank-one matrix vec(A) vec(B)^T and the best sum of k Kronecker
    products is the best rank-k approximation of R(W)."""
    m1, n1 = shape_pair(a_shape)
    return rearrange(W, "... (m1 m2) (n1 n2) -> ... (m1 n1) (m2 n2)", m1=m1, n1=n1)


def kron_decompose(W: torch.Tensor, a_shape: tuple[int, int], k: int = 1,
                   method: str = "exact", niter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Van Loan-Pitsianis: the Frobenius-optimal W ~ sum_{i<k} A_i (x) B_i.

    W: (..., out, in), any leading batch dims. Returns A (..., k, m1, n1) and
    B (..., k, m2, n2) with A_i = sqrt(s_i) u_i and B_i = sqrt(s_i) v_i for the
    top-k singular triplets (s_i, u_i, v_i) of the rearranged matrix.
    method="randomized" uses torch.svd_lowrank (faster for small k, approximate).
    """
    m2, n2 = b_shape_for(tuple(W.shape[-2:]), a_shape, k)    # validates a_shape and k
    m1, n1 = shape_pair(a_shape)
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {SVD_METHODS}")
    work = W if W.dtype == torch.float64 else W.float()      # SVD in at least float32
    R = vl_rearrange(work, (m1, n1))                          # (..., m1*n1, m2*n2)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        U, S, V = U[..., :k], S[..., :k], Vh[..., :k, :].transpose(-1, -2)
    else:
        U, S, V = torch.svd_lowrank(R, q=min(k + 8, *R.shape[-2:]), niter=niter)
        U, S, V = U[..., :k], S[..., :k], V[..., :k]
    root = S.sqrt().unsqueeze(-2)                             # (..., 1, k)
    A = rearrange(U * root, "... (m1 n1) k -> ... k m1 n1", m1=m1)
    B = rearrange(V * root, "... (m2 n2) k -> ... k m2 n2", m2=m2)
    return A.to(W.dtype), B.to(W.dtype)


def kron_sum(A: torch.Tensor, B: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i s_i A_i (x) B_i as a dense (m1*m2, n1*n2) matrix. A: (k, m1, n1), B: (k, m2, n2)."""
    if s is not None:
        A = A * s.view(-1, 1, 1)
    # operand order changes how einsum lowers the sum over k: B first is the faster one for
    # several factors of a small B (Krony-92M's materialised path), and no slower for k = 1
    W = torch.einsum("kbd,kac->abcd", B, A)                   # (m1, m2, n1, n2)
    return rearrange(W, "m1 m2 n1 n2 -> (m1 m2) (n1 n2)")


# -----------------------------------------------------------------------------
# The Kronecker linear layer

class KronLinear(nn.Module):
    """y = x W^T + b with W = sum_i s_i A_i (x) B_i, never materialising W in forward.

    Parameters: A (k, m1, n1), B (k, m2, n2), optional scalars s (k,), optional bias (out,).
    """

    def __init__(self, in_features: int, out_features: int, a_shape: tuple[int, int], k: int = 1,
                 bias: bool = True, scalars: bool = False, sparse: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.b_shape = b_shape_for((out_features, in_features), a_shape, k)  # validates a_shape, k
        self.a_shape = shape_pair(a_shape)
        self.k = k
        self.A = nn.Parameter(torch.empty(k, *self.a_shape))
        self.B = nn.Parameter(torch.empty(k, *self.b_shape))
        self.scalars = nn.Parameter(torch.ones(k)) if scalars else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # optional sparse residual S: W = sum_i s_i A_i (x) B_i + S
        self.sparse = SparseResidual(out_features, in_features, sparse) if sparse > 0 else None
        # one of KRON_PATHS, fixed by the shape (see kron_path);
        # a plain attribute so tests and benchmarks can force another path.
        self.path = kron_path(self.a_shape, self.b_shape, k)
        self.frozen_weight: torch.Tensor | None = None      # set by frozen_kron_weights
        # feature orders (see swap_order and swap_hidden_order): False is the standard order of
        # nn.Linear. Only the order of activations changes; the parameters keep theirs.
        self.swap_in = False
        self.swap_out = False
        self.init_random(0.02)

    def extra_repr(self) -> str:
        swaps = "".join(f", {name}=True" for name in ("swap_in", "swap_out") if getattr(self, name))
        return (f"in={self.in_features}, out={self.out_features}, A={self.a_shape}, B={self.b_shape}, "
                f"k={self.k}, scalars={self.scalars is not None}, bias={self.bias is not None}{swaps}")

    def materialize(self) -> torch.Tensor:
        """The dense weight sum_i s_i A_i (x) B_i, shape (out, in) (the sparse residual, if any,
        is separate: self.sparse.to_dense())."""
        return kron_sum(self.A, self.B, self.scalars)

    def macs_per_row(self) -> int:
        """Forward multiply-adds per input row on the path this layer takes (+ the sparse term)."""
        dense = self.in_features * self.out_features
        macs = dense if self.path == "materialised" else factored_macs(self.a_shape, self.b_shape, self.k)[0]
        return macs + (self.sparse.values.numel() if self.sparse is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_kron(x)
        if self.sparse is None:
            return y
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape     # + x S^T, S kept sparse (standard order)
        ys = self.sparse(swap_order(x, n2, n1) if self.swap_in else x)
        return y + (swap_order(ys, m1, m2) if self.swap_out else ys)

    def forward_kron(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        x2 = x.reshape(-1, self.in_features)                    # (N, n1*n2)
        # a_first reads, and b_first writes, the swapped order natively; the other paths convert
        convert_in = self.swap_in and self.path != "a_first"
        convert_out = self.swap_out and self.path != "b_first"
        if convert_in:
            x2 = swap_order(x2, n2, n1)
        if self.path == "materialised":
            frozen = self.frozen_weight is not None and not torch.is_grad_enabled()
            W = self.frozen_weight if frozen else self.materialize()
            y = F.linear(x2, W.to(x.dtype), self.bias)
        else:
            A, B = self.A, self.B
            if self.scalars is not None:
                B = B * self.scalars.view(-1, 1, 1)            # s_i A_i (x) B_i = A_i (x) (s_i B_i)
            if self.path.endswith("_bmm"):
                y = kron_matmul_bmm(x2, A, B, self.bias, a_first=self.path == "a_first_bmm")
            elif self.path == "a_first":
                y = kron_matmul_a_first(x2, A.to(x.dtype), B.to(x.dtype), self.bias, swapped_in=self.swap_in)
            else:
                y = kron_matmul_b_first(x2, A.to(x.dtype), B.to(x.dtype), self.bias, swapped_out=self.swap_out)
        if convert_out:
            y = swap_order(y, m1, m2)
        return y.view(*x.shape[:-1], self.out_features)              # (..., m1*m2)

    @torch.no_grad()
    def init_random(self, std: float = 0.02) -> None:
        """Random factors whose dense weight sum_i A_i (x) B_i has entries of standard deviation
        `std`, for any k. Each entry is a sum of k products a * b of independent zero-mean
        normals, of variance k * std_A^2 * std_B^2; A and B each get std_A = std_B =
        (std^2 / k)^(1/4), which makes it std^2 in expectation and keeps the two factors at the
        same scale. A small factor (B of 2x2 has 4 entries) makes the realised spread vary a lot
        around that, so both factors are then rescaled to give exactly `std`.
        Scalars start at 1 and the sparse residual's values at 0."""
        if not std >= 0:
            raise ValueError(f"init_random needs a standard deviation >= 0, got std={std}")
        factor_std = (std ** 2 / self.k) ** 0.25
        nn.init.normal_(self.A, std=factor_std)
        nn.init.normal_(self.B, std=factor_std)
        if self.A.device.type != "meta":
            realised = kron_sum(self.A, self.B).std()
            if realised > 0:
                root = (std / realised).sqrt()
                self.A.mul_(root)
                self.B.mul_(root)
        if self.scalars is not None:
            self.scalars.fill_(1.0)
        if self.sparse is not None:
            self.sparse.values.zero_()

    @torch.no_grad()
    def init_from_weight(self, W: torch.Tensor, init: str = "vl-norm", svd: str = "exact",
                         prune_b_second: float = 0.1, random_std: float = 0.02) -> None:
        """Set the factors from a dense weight W (out, in) with one of INITS.

        "random" ignores W's values: a fresh weight of standard deviation random_std (init_random;
        0.02 is GPT-2's init for a dense layer). The layer does not know where it sits in the
        model; compress passes the std of the weight it replaces.
        "prune" uses B = [1, prune_b_second] (see prune_factors)."""
        if init not in INITS:
            raise ValueError(f"unknown Kronecker init {init!r}; choose one of {', '.join(INITS)}")
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(W.shape)} does not fit KronLinear "
                             f"(out={self.out_features}, in={self.in_features})")
        if self.scalars is not None:
            self.scalars.fill_(1.0)
        if init == "random":
            self.init_random(random_std)
        elif init == "prune":
            if self.k > 1:
                raise ValueError("init='prune' makes one factor; use k=1 (kron_factors=1)")
            A, B = prune_factors(W, self.a_shape, self.b_shape, prune_b_second)
            self.A.copy_(A[None])
            self.B.copy_(B[None])
        else:
            A, B = kron_decompose(W, self.a_shape, self.k, method=svd)
            if init == "vl-norm":
                # Krony-PT 3.3.2: alpha = ||W|| / ||W_hat||, so the norms match exactly
                alpha = W.float().norm() / kron_sum(A.float(), B.float()).norm().clamp_min(1e-12)
                if self.scalars is not None:
                    self.scalars.fill_(alpha.item())
                else:
                    # fold alpha into the factors, sqrt into each so they stay balanced
                    A, B = A * alpha.sqrt(), B * alpha.sqrt()
            self.A.copy_(A)
            self.B.copy_(B)
        if self.sparse is not None:       # S takes the largest entries of what the factors miss
            self.sparse.init_from_residual(W.to(self.A.dtype) - self.materialize())

    @classmethod
    def from_linear(cls, linear: nn.Linear, a_shape: tuple[int, int], k: int = 1,
                    init: str = "vl-norm", scalars: bool = False, svd: str = "exact",
                    sparse: float = 0.0) -> "KronLinear":
        """A KronLinear approximating `linear` (weights initialised by `init`, bias copied;
        sparse=p adds the largest fraction p of the residual as a sparse term)."""
        layer = cls(linear.in_features, linear.out_features, a_shape, k,
                    bias=linear.bias is not None, scalars=scalars, sparse=sparse)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.init_from_weight(linear.weight.detach(), init, svd)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer


def sparse_count(shape: tuple[int, int], fraction: float) -> int:
    """Entries a sparse residual keeps for a weight of `shape` and fraction p:
    round(p * out * in). It follows from p and the shape alone, so state dicts
    of the same config always have the same shapes."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"kron_sparse must be a fraction in [0, 1], got {fraction}")
    numel = shape[0] * shape[1]
    return min(numel, int(math.floor(fraction * numel + 0.5)))


class SparseResidual(nn.Module):
    """S (out, in) with nnz entries: trainable values at fixed (row, col) positions.

    Init keeps the largest-magnitude fraction p of the residual R = W - W_hat, so the
    squared error drops from ||R||^2 to ||R||^2 - ||S||^2. forward returns x S^T with a
    sparse matmul; S is never densified. The positions are a buffer (int64 (2, nnz),
    sorted row-major so the COO tensor is coalesced): index_bytes() is their memory."""

    def __init__(self, out_features: int, in_features: int, fraction: float):
        super().__init__()
        self.out_features, self.in_features, self.fraction = out_features, in_features, fraction
        nnz = sparse_count((out_features, in_features), fraction)
        flat = torch.arange(nnz)                      # placeholder positions until init_from_residual
        self.register_buffer("index", torch.stack([flat // in_features, flat % in_features]))
        self.values = nn.Parameter(torch.zeros(nnz))

    def extra_repr(self) -> str:
        return f"p={self.fraction:g}, nnz={self.values.numel()}, index_bytes={self.index_bytes()}"

    def index_bytes(self) -> int:
        return self.index.numel() * self.index.element_size()

    @torch.no_grad()
    def init_from_residual(self, R: torch.Tensor) -> None:
        """Keep the nnz largest-magnitude entries of the residual R (out, in)."""
        nnz = self.values.numel()
        flat = R.reshape(-1)
        keep = flat.abs().topk(nnz, sorted=False).indices.sort().values   # row-major order: coalesced
        self.index.copy_(torch.stack([keep // self.in_features, keep % self.in_features]))
        self.values.copy_(flat[keep])

    def to_dense(self) -> torch.Tensor:
        S = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        return S.index_put((self.index[0], self.index[1]), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x S^T (..., out); differentiable wrt the values and x."""
        S = torch.sparse_coo_tensor(self.index, self.values.to(x.dtype), (self.out_features, self.in_features),
                                    is_coalesced=True, check_invariants=False)
        y = torch.sparse.mm(S, x.reshape(-1, self.in_features).t())        # (out, N)
        return y.t().reshape(*x.shape[:-1], self.out_features).to(x.dtype)


# -----------------------------------------------------------------------------
# Initialisations without an SVD

def prune_factors(W: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int],
                  b_second: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Krony-PT 3.3.3: A keeps every other row (B (2, 1)) or column (B (1, 2)) of W, and
    B = [1, b_second]: the paper's text gives 0.1, its original code used 0.

    A (x) B then reproduces the kept rows (columns) exactly and fills the others with
    b_second times their neighbour (with b_second = 0, zeros). No SVD."""
    a_shape, b_shape = shape_pair(a_shape), shape_pair(b_shape, "B shape", "(m2, n2)")
    if b_shape == (2, 1):
        A, B = W[0::2, :], torch.tensor([[1.0], [b_second]])
    elif b_shape == (1, 2):
        A, B = W[:, 0::2], torch.tensor([[1.0, b_second]])
    else:
        raise ValueError(
            f"init='prune' needs B of shape (2, 1) or (1, 2) (the 96M class, A = (1536, 768) "
            f"for GPT-2 small); this A shape {a_shape} gives B {b_shape}. Use init='vl' or 'vl-norm'.")
    assert tuple(A.shape) == a_shape
    return A.clone(memory_format=torch.contiguous_format), B.to(W)   # a copy, whatever W's strides


# -----------------------------------------------------------------------------
# Model-level helpers

def swap_hidden_order(fc: nn.Module, proj: nn.Module) -> bool:
    """Let an MLP's c_fc write, and its c_proj read, the hidden features in the swapped order
    (see swap_order) where that saves both a layout copy; returns whether it did.

    c_fc on the b_first path computes its output in (i2, i1) order, and c_proj on the a_first
    path reads its input in (j2, j1) order (B of 3x3 or 2x2); in the standard order each would
    copy the whole hidden activation through a strided transpose, forward and backward (four
    copies of the hidden activation per step). Between the two the hidden features only pass
    through GELU, which acts on each alone, so the MLP computes exactly the same function either
    way; the parameters, checkpoints, materialize() and exports are unchanged."""
    if not (isinstance(fc, KronLinear) and isinstance(proj, KronLinear)):
        return False
    (m1, _), (m2, _) = fc.a_shape, fc.b_shape
    swap = (fc.path == "b_first" and proj.path == "a_first" and m2 > 1
            and (proj.a_shape[1], proj.b_shape[1]) == (m1, m2)
            and fc.sparse is None and proj.sparse is None)     # a sparse term reads the standard order
    fc.swap_out = proj.swap_in = swap
    return swap


@contextlib.contextmanager
def frozen_kron_weights(model):
    """Within this block, KronLinear layers on the materialised path build W once instead of
    on every forward without gradients. Decoding needs it: rebuilding W for each new token
    would make Krony-92M (4 factors) slower than dense GPT-2. The factors must not change
    inside the block; forwards that need gradients still use the live factors. `model` may
    be any callable (evaluation accepts stubs); only an nn.Module can hold KronLinear layers."""
    modules = model.modules() if isinstance(model, nn.Module) else []
    layers = [m for m in modules if isinstance(m, KronLinear) and m.path == "materialised"]
    outer = [m.frozen_weight for m in layers]          # blocks may nest
    try:
        with torch.no_grad():
            for m in layers:
                m.frozen_weight = m.materialize()
        yield model
    finally:
        for m, w in zip(layers, outer):
            m.frozen_weight = w


# -----------------------------------------------------------------------------
# Fast paths: x (sum_i A_i (x) B_i)^T without the dense weight

def factored_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], k: int = 1) -> tuple[int, str]:
    """Multiply-adds per input row of the cheaper contraction order, and that order.

    "a_first": U = A X (m1*n1*n2), then U B^T (m1*n2*m2).
    "b_first": V = X B^T (n1*n2*m2), then A V (m1*n1*m2).
    The backward pass mirrors the forward (dX, dA, dB each cost one of the two
    contractions again), so forward+backward costs 3x this, like a dense layer."""
    (m1, n1), (m2, n2) = shape_pair(a_shape), shape_pair(b_shape, "B shape", "(m2, n2)")
    a_first = m1 * n1 * n2 + m1 * n2 * m2
    b_first = n1 * n2 * m2 + m1 * n1 * m2
    return (k * a_first, "a_first") if a_first <= b_first else (k * b_first, "b_first")


# Below this arithmetic speed-up (dense multiply-adds / factored multiply-adds) the
# two thin GEMMs and their layout copies lose to one big GEMM on the materialised
# weight (see `python bench.py --sections layer`, CPU and GPU).
MIN_FACTORED_SPEEDUP = 1.25
# "*_bmm" paths: when both sides of B are at least this wide (B of (48, 24), (24, 24): the
# 67M class), every row's small product with A runs as one batched GEMM and the layout
# copies of the stacked paths disappear, which makes forward+backward faster there
# (bench.py). With a narrower B the per-row products are too thin for a batched GEMM
# and the stacked paths win.
MIN_BMM_B_SIDE = 12
KRON_PATHS = ("materialised", "a_first", "b_first", "a_first_bmm", "b_first_bmm")
# Up to this many input rows (decoding a few sequences), a tiny B multiplies plainly:
# building thin_matmul's block-diagonal copy of B costs more than it saves (bench.py).
FEW_ROWS = 8


def kron_path(a_shape: tuple[int, int], b_shape: tuple[int, int], k: int = 1) -> str:
    """The forward path for a layer of this shape: static, so torch.compile sees one graph."""
    (m1, n1), (m2, n2) = shape_pair(a_shape), shape_pair(b_shape, "B shape", "(m2, n2)")
    macs, order = factored_macs(a_shape, b_shape, k)
    if m1 * m2 * n1 * n2 < MIN_FACTORED_SPEEDUP * macs:
        return "materialised"
    return order + "_bmm" if min(m2, n2) >= MIN_BMM_B_SIDE else order


def thin_group(row_factor: int, K: int, M: int) -> int:
    """How many rows thin_matmul multiplies at once for an (R, K) @ (K, M) product whose R is a
    multiple of row_factor: the largest g <= 8 dividing row_factor with g * max(K, M) <= 16,
    when K and M are both at most 4 (B of 2x2, 3x3, 4x1, 1x4); 1 otherwise. A matrix-vector
    product (M == 1, c_proj's B of 1x4 or 1x2) is grouped too: BLAS runs (R, 4) @ (4, 1)
    forward+backward far slower than the grouped (R/4, 16) @ (16, 4) (bench.py)."""
    if max(K, M) > 4:
        return 1
    return next(g for g in range(8, 0, -1) if row_factor % g == 0 and g * max(K, M) <= 16)


def thin_matmul(x: torch.Tensor, w: torch.Tensor, group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, K) @ w (K, M) for a tiny w, + bias (a (P*M,) vector that repeats every P rows).

    BLAS runs an (R, 3) @ (3, 3) product far below its speed, so g consecutive rows go through
    g copies of w on a block diagonal at once: (R/g, g*K) @ (g*K, g*M). That is g times the
    multiply-adds of a step that has very few, and much faster (bench.py). The bias is added
    in place: a fresh output-sized tensor would cost a second pass over memory (and, when
    large, fresh pages from glibc on every call)."""
    R, K = x.shape
    M = w.shape[1]
    if group > 1:
        x, w = x.reshape(R // group, group * K), torch.block_diag(*[w] * group)
    if bias is None:
        return (x @ w).view(R, M)
    P = bias.numel() // M                                   # a multiple of group
    y = torch.matmul(x.view(R // P, P // group, group * K), w)   # (R/P, P/g, g*M), not a view
    return y.add_(bias.view(P // group, group * M)).view(R, M)


def swap_order(t: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """t (..., p*q) read as (..., p, q) -> (..., q*p) (a copy): a Kronecker layer's features
    from one of their two index orders into the other. A layer's output feature (i1, i2) (row i1
    of A, row i2 of B) sits at i1*m2 + i2 in the standard order, as in torch.kron and nn.Linear,
    and at i2*m1 + i1 in the swapped order: swap_order(y, m1, m2) swaps, swap_order(y, m2, m1)
    swaps back. The same holds for an input with (n1, n2)."""
    return t.unflatten(-1, (p, q)).transpose(-1, -2).flatten(-2)


def kron_matmul_a_first(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        bias: torch.Tensor | None = None, swapped_in: bool = False) -> torch.Tensor:
    """x (N, n1*n2) -> (N, m1*m2) = x (sum_i A_i (x) B_i)^T + bias as two plain GEMMs, A first.

    Per row, Y = sum_i A_i X B_i^T with X = x.view(n1, n2). The k factors are
    batched by stacking them into the GEMMs: along the output of the first and
    along the reduction of the second (so the sum over i is free).
    swapped_in: x's features come in (j2, j1) order (see swap_order), which is the
    order the product with A reads, so the transposed copy of x is skipped."""
    k, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.shape[0]
    # .contiguous(): where N or n2 is 1 the reshapes are strided views, which BLAS
    # multiplies far slower than a copy costs (one-token decoding)
    X = x.reshape(N, n2, n1) if swapped_in else x.view(N, n1, n2).transpose(1, 2)
    Xt = X.reshape(N * n2, n1).contiguous()                             # (N*n2, n1)
    U = Xt @ A.reshape(k * m1, n1).t()                                  # (N*n2, k*m1)
    U = U.view(N, n2, k, m1).permute(0, 3, 2, 1).reshape(N * m1, k * n2).contiguous()  # (N*m1, k*n2)
    Bt = B.transpose(1, 2).reshape(k * n2, m2)                         # (k*n2, m2)
    group = thin_group(m1, k * n2, m2) if N > FEW_ROWS else 1
    bias = None if bias is None else bias.to(U.dtype)
    return thin_matmul(U, Bt, group, bias).view(N, m1 * m2)            # summed over i


def kron_matmul_b_first(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        bias: torch.Tensor | None = None, swapped_out: bool = False) -> torch.Tensor:
    """Same product as kron_matmul_a_first, B first: V = X B_i^T, then Y = sum_i A_i V_i.
    The product with A writes its output in (i2, i1) order; swapped_out returns it that
    way (see swap_order) instead of copying it into the standard order."""
    k, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.shape[0]
    Bt = B.reshape(k * m2, n2).t()                                      # (n2, k*m2)
    group = thin_group(n1, n2, k * m2) if N > FEW_ROWS else 1
    V = thin_matmul(x.reshape(N * n1, n2), Bt, group)                   # (N*n1, k*m2), no input copy
    # (N, m2, k*n1): a strided view for k = 1, else a copy
    V = V.view(N, n1, k, m2).permute(0, 3, 2, 1).reshape(N, m2, k * n1)
    At = A.transpose(0, 1).reshape(m1, k * n1).t()                      # (k*n1, m1)
    if bias is not None:
        bias = bias.to(V.dtype)
    if m2 == 1 and bias is not None:                        # both orders are one: the bias in the GEMM
        return torch.addmm(bias, V.view(N, k * n1), At)
    if swapped_out and bias is not None and N * m2 >= k * n1:
        # the bias rides in the GEMM: row (n, i2) of V gets the one-hot of i2 appended and A^T
        # gets the bias as m2 more rows, so [V, e_i2] @ [A^T; bias[:, i2]^T] = V A^T + bias.
        # That saves a pass over the output forward and the bias gradient's sum backward,
        # for a copy of A^T: worth it only where the output has more rows than A^T (not
        # when decoding a few tokens).
        onehot = torch.eye(m2, dtype=V.dtype, device=V.device).expand(N, m2, m2)
        V = torch.cat([V, onehot], dim=2)                               # (N, m2, k*n1 + m2), a copy
        Yt = torch.matmul(V, torch.cat([At, bias.view(m1, m2).t()]))    # (N, m2, m1)
        return Yt.view(N, m2 * m1)
    Yt = torch.matmul(V, At)                                # (N, m2, m1), summed over i; not a view
    if swapped_out or m2 == 1:
        return (Yt if bias is None else Yt.add_(bias.view(m1, m2).t())).view(N, m2 * m1)
    Y = Yt.transpose(1, 2)                                              # (N, m1, m2), a strided view
    if bias is None:
        return Y.reshape(N, m1 * m2)                                    # a copy
    # bias first: the sum then takes the bias's row-major layout, so adding the bias and
    # copying Y into (N, m1*m2) order are one pass over the output instead of two
    return (bias.view(m1, m2) + Y).view(N, m1 * m2)


def summed_products(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """sum_r P[r] @ Q[r]^T for P (N, a, c), Q (N, b, c): an (a, b) matrix in P's dtype.

    A batched GEMM, then the sum over rows, a chunk of rows at a time: the (N, a, b)
    products of all rows at once would be one large allocation, and glibc gives large
    allocations fresh pages on every call. The running sum is kept in float32 (float64
    for float64 operands) and cast once at the end: in bfloat16 every chunk added would
    round it again, and its error would grow with the number of rows."""
    N, a, _ = P.shape
    b = Q.shape[1]
    rows = max(1, (1 << 20) // (a * b))                     # chunks of at most 2^20 entries
    acc = torch.promote_types(P.dtype, torch.float32)
    total = torch.zeros(a, b, dtype=acc, device=P.device)
    for s in range(0, N, rows):
        total = total + torch.bmm(P[s:s + rows], Q[s:s + rows].transpose(1, 2)).sum(0, dtype=acc)
    return total.to(P.dtype)


def gram_product(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P^T Q for tall P (R, a), Q (R, b): a sum over R rows. BLAS runs it faster with the
    narrower operand transposed on the left, so the product is taken in that order and
    transposed back (a view)."""
    return P.t() @ Q if P.shape[1] <= Q.shape[1] else (Q.t() @ P).t()


class KronBmm(torch.autograd.Function):
    """x (N, n1*n2) -> x (A (x) B)^T + bias for one factor, with no layout copy.

    Per row, Y = A X B^T with X = x.view(n1, n2). The product with B acts on the
    contiguous last dimension, so all rows make one plain GEMM; the product with A
    acts on the middle dimension, so it runs as a batched GEMM over rows with A
    broadcast (stride 0), which reads and writes every tensor in its natural layout.
    a_first: U = A X, then Y = U B^T.  b_first: V = X B^T, then Y = A V.
    The backward uses the same two forms: dX = A^T dY B, dA = sum_r dY_r B X_r^T,
    dB = sum_r dY_r^T A X_r (a plain GEMM over all rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                bias: torch.Tensor | None, a_first: bool) -> torch.Tensor:
        (m1, n1), (m2, n2), N = A.shape, B.shape, x.shape[0]
        X = x.view(N, n1, n2)
        if a_first:
            U = torch.bmm(A.expand(N, m1, n1), X)                           # (N, m1, n2)
            Y = U.view(N * m1, n2) @ B.t()                                  # (N*m1, m2)
            ctx.save_for_backward(X, A, B, U)
        else:
            V = (X.view(N * n1, n2) @ B.t()).view(N, n1, m2)                # (N, n1, m2)
            Y = torch.bmm(A.expand(N, m1, n1), V)                           # (N, m1, m2)
            ctx.save_for_backward(X, A, B, V)
        Y = Y.view(N, m1 * m2)
        if bias is not None:
            Y.add_(bias)                                                    # Y is ours: in place
        ctx.a_first, ctx.has_bias = a_first, bias is not None
        return Y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        X, A, B, T = ctx.saved_tensors
        (m1, n1), (m2, n2), N = A.shape, B.shape, X.shape[0]
        dY = dy.contiguous().view(N, m1, m2)
        At = A.t().expand(N, n1, m1)
        if ctx.a_first:                                     # T = U = A X
            dU = (dY.view(N * m1, m2) @ B).view(N, m1, n2)                  # dY B
            dX = torch.bmm(At, dU)                                          # (N, n1, n2)
            dA = summed_products(dU, X)                                     # sum_r dU_r X_r^T
            dB = gram_product(dY.view(N * m1, m2), T.view(N * m1, n2))      # sum_r dY_r^T U_r
        else:                                               # T = V = X B^T
            dV = torch.bmm(At, dY)                                          # (N, n1, m2): A^T dY
            dX = dV.view(N * n1, m2) @ B                                    # (N*n1, n2)
            dA = summed_products(dY, T)                                     # sum_r dY_r V_r^T
            dB = gram_product(dV.view(N * n1, m2), X.view(N * n1, n2))      # sum_r dV_r^T X_r
        # the bias gradient as a matrix-vector product: BLAS reads dy faster than sum(0) does
        db = torch.mv(dy.t(), dy.new_ones(N)) if ctx.has_bias else None
        return dX.view(N, n1 * n2), dA, dB, db, None


def kron_matmul_bmm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                    a_first: bool) -> torch.Tensor:
    """x (N, n1*n2) -> (N, m1*m2) = x (sum_i A_i (x) B_i)^T + bias with KronBmm, one call per
    factor (every big-B shape of the paper has k = 1). Under autocast the operands are cast
    to the autocast dtype first, as nn.Linear's are, so the backward sees one dtype."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, A, B = x.to(dtype).contiguous(), A.to(dtype), B.to(dtype)       # views below need rows of n1*n2
    y = KronBmm.apply(x, A[0], B[0], None if bias is None else bias.to(dtype), a_first)
    for i in range(1, A.shape[0]):
        y = y + KronBmm.apply(x, A[i], B[i], None, a_first)
    return y


# -----------------------------------------------------------------------------
# Free permutations before Van Loan
#
# A dense MLP computes the same function with its hidden units in any order (GELU acts on each
# alone), and a dense GPT with its residual-stream features in any order applied to every layer
# at once (LayerNorm's mean and variance do not depend on it). The Van Loan error does depend on
# the order: unit h sits at block position (h // P2, h % P2). The search below looks for the order
# under which the matrices are closest to sums of k Kronecker products, for the init that will be
# used. model.py applies what it finds to a GPT before compressing it; at run time it costs nothing.
#
# Each search alternates (1) Van Loan at the current order with (2) assigning every unit to the
# position whose approximation it is closest to (a linear assignment problem), from the identity
# and from a structured start (units grouped by shared column / row spaces), and keeps the best
# order seen.

PERMUTATION_OBJECTIVES = ("vl", "vl-norm")
# The structured start tries every order of each group of units (see _orient_groups) up to
# this many units per group (4! = 24 orders)
MAX_ORIENTED_GROUP = 4


@dataclass
class PermutationSearch:
    """What a search found. perm (LongTensor) reorders the permuted axis: position p
    holds original index perm[p]. errors_*: the relative Frobenius error of each matrix
    with the objective's approximation, at the identity order and at perm.
    start: which start the best order came from ("identity" or "structured")."""
    perm: torch.Tensor
    errors_before: list[float]
    errors_after: list[float]
    iterations: int = 0
    start: str = "identity"

    @property
    def total_before(self) -> float:
        return sum(self.errors_before)

    @property
    def total_after(self) -> float:
        return sum(self.errors_after)


@dataclass
class PermutationTerm:
    """One matrix in a permutation search: W (out, in), to be decomposed with A of a_shape and B of
    b_shape into k factors for the init `objective` ("vl" or "vl-norm"), and the axis (0: rows,
    1: columns) the permutation acts on.

    Index i along that axis sits at block position (i // P2, i % P2), (P1, P2) = (A, B)'s
    sizes along the axis; the other axis has sizes (s1, s2). Unit i's slice of W, read as an
    (s1, s2) matrix, is then sum_k a_k b_k^T with a_k from A_k (depends on the first position
    only) and b_k from B_k (the second only)."""
    W: torch.Tensor
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    axis: int
    k: int = 1
    objective: str = "vl-norm"

    @property
    def positions(self) -> tuple[int, int]:
        return self.a_shape[self.axis], self.b_shape[self.axis]

    def rows(self) -> torch.Tensor:
        """W with the permuted axis first: (N, s1*s2)."""
        return self.W if self.axis == 0 else self.W.t()

    def units(self) -> torch.Tensor:
        """(N, s1, s2): each unit's slice as a matrix."""
        return self.rows().reshape(-1, self.a_shape[1 - self.axis], self.b_shape[1 - self.axis])


def _check_objective(objective: str) -> None:
    if objective not in PERMUTATION_OBJECTIVES:
        raise ValueError(f"unknown permutation objective {objective!r}; "
                         f"choose one of {', '.join(PERMUTATION_OBJECTIVES)}")


def _check_term(t: PermutationTerm) -> None:
    """One clear error for a term whose shapes do not fit together (else an IndexError deep inside)."""
    _check_objective(t.objective)
    if t.axis not in (0, 1):
        raise ValueError(f"axis={t.axis!r}: 0 permutes W's rows, 1 its columns")
    (m1, n1), (m2, n2) = t.a_shape, t.b_shape
    if tuple(t.W.shape) != (m1 * m2, n1 * n2):
        raise ValueError(f"A {tuple(t.a_shape)} (x) B {tuple(t.b_shape)} is ({m1 * m2}, {n1 * n2}), but W is "
                         f"{tuple(t.W.shape)}: take B = b_shape_for(W.shape, A, k)")
    check_factors(t.a_shape, t.b_shape, t.k)


def kron_approximation(W: torch.Tensor, a_shape: tuple[int, int], k: int = 1,
                       objective: str = "vl-norm", svd: str = "exact") -> torch.Tensor:
    """The dense init a compression would start from: the Van Loan sum of k products,
    scaled by alpha = ||W|| / ||W_hat|| for "vl-norm" (as KronLinear.init_from_weight)."""
    W_hat = kron_sum(*kron_decompose(W, a_shape, k, method=svd))
    if objective == "vl-norm":
        W_hat = W_hat * (W.norm() / W_hat.norm().clamp_min(1e-12))
    return W_hat


def relative_error(W: torch.Tensor, a_shape: tuple[int, int], k: int = 1, objective: str = "vl-norm",
                   svd: str = "exact") -> float:
    """||W - W_hat|| / ||W|| for the objective's approximation W_hat."""
    W = W if W.dtype == torch.float64 else W.float()
    return ((W - kron_approximation(W, a_shape, k, objective, svd)).norm() / W.norm().clamp_min(1e-12)).item()


# -----------------------------------------------------------------------------
# The alternating search: Van Loan at a fixed order, then the best order for fixed factors

def _evaluate(terms: list[PermutationTerm], perm: torch.Tensor,
              svd: str = "exact") -> tuple[list[float], list[torch.Tensor]]:
    """Decompose every matrix at the order `perm`: relative errors and approximations."""
    errors, approximations = [], []
    for t in terms:
        W = t.W.index_select(t.axis, perm)
        W_hat = kron_approximation(W, t.a_shape, t.k, t.objective, svd)
        errors.append(((W - W_hat).norm() / W.norm().clamp_min(1e-12)).item())
        approximations.append(W_hat)
    return errors, approximations


def _assignment_cost(terms: list[PermutationTerm], approximations: list[torch.Tensor]) -> torch.Tensor:
    """cost[u, p] for moving original index u to position p while the approximations stay
    fixed: sum over matrices of ||X[u] - X_hat[p]||^2 = ||X[u]||^2 + ||X_hat[p]||^2 - 2 X[u].X_hat[p]
    (X: W with its permuted axis first). Every assignment pays each ||X[u]||^2 and each
    ||X_hat[p]||^2 exactly once, so only the products decide which is best; leaving the norms
    out keeps the optimum and makes linear_sum_assignment converge much faster."""
    cost = 0
    for t, W_hat in zip(terms, approximations):
        X, X_hat = t.rows(), (W_hat if t.axis == 0 else W_hat.t())                  # (N, F) both
        cost = cost - 2 * (X @ X_hat.t()).double()                                   # (N, N)
    return cost


def _assign(cost: torch.Tensor) -> torch.Tensor:
    """The permutation of least total cost[u, p]: perm[p] = the u assigned to position p."""
    units, positions = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.from_numpy(positions)] = torch.from_numpy(units)
    return perm.to(cost.device)


def _alternate(terms: list[PermutationTerm], start: torch.Tensor, svd: str, max_iters: int, tol: float,
               evaluated: tuple[list[float], list[torch.Tensor]] | None = None
               ) -> tuple[torch.Tensor, list[float], int]:
    """From the order `start`, alternate Van Loan at the current order with moving every
    index to the position whose approximation it is closest to, while the summed relative
    error drops by more than tol (relative). For "vl" neither step can raise the summed
    squared error: the assignment is optimal for fixed approximations, Van Loan for a fixed
    order. evaluated: _evaluate's result at `start` where the caller has it. Returns the best
    order seen, its errors and the iterations run."""
    best = start
    best_errors, approximations = evaluated or _evaluate(terms, start, svd)
    iterations = 0
    while iterations < max_iters:
        iterations += 1
        perm = _assign(_assignment_cost(terms, approximations))
        errors, approximations = _evaluate(terms, perm, svd)
        if sum(errors) >= sum(best_errors) * (1 - tol):
            break
        best, best_errors = perm, errors
    return best, best_errors, iterations


# -----------------------------------------------------------------------------
# A structured start: the alternation above keeps whatever grouping it starts from (each
# row of A is fit to the few units that share it, so they stay together). Units that belong
# together share their column space (same first position: span of the a_k) or their row space
# (same second position: span of the b_k), whatever their scale, so group them by that first.

def _top_subspace(S: torch.Tensor, k: int) -> torch.Tensor:
    """S (..., s, c) -> an orthonormal basis (..., s, min(k, s, c)) of the span of its top-k
    left singular vectors. Through the eigenvectors of the smaller Gram matrix (in float64):
    batches of thin matrices are many times faster that way than through an SVD each."""
    s, c = S.shape[-2:]
    r = min(k, s, c)
    S64 = S.double()
    wide = s <= c
    lam, E = torch.linalg.eigh(S64 @ S64.mT if wide else S64.mT @ S64)    # ascending eigenvalues
    lam, E = lam[..., -r:], E[..., -r:]
    U = E if wide else (S64 @ E) * lam.clamp_min(1e-300).rsqrt()[..., None, :]   # U = S V / sigma
    # directions without energy (a slice of rank < k) would be arbitrary: zeros instead
    keep = lam > 1e-12 * lam[..., -1:].clamp_min(1e-300)
    return (U * keep[..., None, :]).to(S.dtype)


def _captured(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||Q_p^T M_u||^2 for M (N, s, c) and bases Q (P, s, r): the energy of each unit's columns
    inside each subspace, (N, P), as one matrix product."""
    N, s, c = M.shape
    P, _, r = Q.shape
    Z = M.transpose(1, 2).reshape(N * c, s) @ Q.permute(1, 0, 2).reshape(s, P * r)   # (N*c, P*r)
    return Z.view(N, c, P, r).square().sum((1, 3))


def _spread_seeds(units: list[torch.Tensor], ks: list[int], count: int) -> torch.Tensor:
    """`count` units whose column spaces are far apart, farthest first: each next seed is the
    unit whose slices the seeds so far capture the smallest fraction of (k-means++ without
    the randomness). Units that belong together share a column space, so on structured
    weights every group gets one seed; seeding from an arbitrary order would give some
    groups two and others none."""
    norms = sum(M.square().sum((1, 2)) for M in units).clamp_min(1e-30)
    bases = [_top_subspace(M, k) for M, k in zip(units, ks)]   # (N, s1, r): each unit's column space
    columns = [M.transpose(1, 2).reshape(-1, M.shape[1]) for M in units]   # (N*s2, s1), copied once
    missed = torch.ones_like(norms)                  # fraction of each unit no seed captures
    seeds = [int(norms.argmax())]
    while len(seeds) < count:
        captured = sum((X @ Q[seeds[-1]]).view(len(norms), -1).square().sum(1)
                       for X, Q in zip(columns, bases))
        missed = torch.minimum(missed, 1 - captured / norms)
        missed[seeds[-1]] = -1                       # never twice
        seeds.append(int(missed.argmax()))
    return torch.tensor(seeds, device=norms.device)


def _subspace_start(units: list[torch.Tensor], ks: list[int], positions: tuple[int, int],
                    max_iters: int) -> torch.Tensor:
    """An order grouping units by shared column and row spaces: a balanced two-way subspace
    clustering, solved as an assignment. Position (p1, p2) has a column basis Qa[p1] and a
    row basis Qb[p2]; each unit goes where its slices keep the most energy, subject to one
    unit per position. The first bases come from spread-out single units (_spread_seeds),
    the next ones from the groups of the previous assignment."""
    P1, P2 = positions
    N = P1 * P2
    uses_a = any(M.shape[1] > k for M, k in zip(units, ks))      # else every span is the whole space
    uses_b = any(M.shape[2] > k for M, k in zip(units, ks))
    seeds_a = _spread_seeds(units, ks, P1) if uses_a else None
    seeds_b = _spread_seeds([M.transpose(1, 2) for M in units], ks, P2) if uses_b else None
    perm, best = None, None
    for it in range(max_iters):
        gain = torch.zeros(N, P1, P2, dtype=torch.float64, device=units[0].device)
        for M, k in zip(units, ks):
            _, s1, s2 = M.shape
            G = None if perm is None else M[perm].view(P1, P2, s1, s2)   # units at their positions
            if s1 > k:
                S = M[seeds_a] if G is None else G.permute(0, 2, 1, 3).reshape(P1, s1, P2 * s2)
                gain += _captured(M, _top_subspace(S, k)).double()[:, :, None]
            if s2 > k:
                S = M[seeds_b].transpose(1, 2) if G is None else G.permute(1, 3, 0, 2).reshape(P2, s2, P1 * s1)
                gain += _captured(M.transpose(1, 2), _top_subspace(S, k)).double()[:, None, :]
        cost = -gain.view(N, N)
        new = _assign(cost)
        total = cost[new, torch.arange(N, device=new.device)].sum().item()
        if best is not None and total >= best - abs(best) * 1e-9:
            break
        perm, best = new, total
    return perm


def _orient_groups(units: list[torch.Tensor], ks: list[int], positions: tuple[int, int],
                   perm: torch.Tensor, max_iters: int) -> torch.Tensor:
    """Within each group of P2 units sharing a first position, try every order and keep the one
    whose slices lie best in the B side of the current factors. Subspaces carry no scale, so the
    structured start cannot tell (x, 0.1 x) from (0.1 x, x); half the groups come out reversed,
    the Van Loan B of that order averages both ways, and the alternation, whose A refits each
    group, sees no difference between them. The first B comes from the single most Kronecker-like
    group (the one with most of its energy in k singular values), the next ones from all groups."""
    P1, P2 = positions
    if not 1 < P2 <= MAX_ORIENTED_GROUP:
        return perm
    orders = torch.tensor(list(itertools.permutations(range(P2))), device=perm.device)   # (n_orders, P2)
    for it in range(max_iters):
        energy = torch.zeros(P1, len(orders), dtype=torch.float64, device=perm.device)
        for M, k in zip(units, ks):
            _, s1, s2 = M.shape
            G = M[perm].view(P1, P2, s1, s2)
            Y = G.permute(0, 2, 1, 3).reshape(P1, s1, P2 * s2)             # each group's slice of R(W)
            if it == 0:
                Y64 = Y.double()
                gram = Y64.mT @ Y64 if Y.shape[1] >= Y.shape[2] else Y64 @ Y64.mT   # the smaller one
                energy_k = torch.linalg.eigvalsh(gram)[:, -k:].sum(1)                 # top-k energy
                Y_ref = Y[(energy_k / Y64.square().sum((1, 2)).clamp_min(1e-300)).argmax()]
            else:
                Y_ref = Y.reshape(P1 * s1, P2 * s2)
            V = _top_subspace(Y_ref.mT, k).reshape(P2, s2, -1)           # right singular vectors
            Z = torch.einsum("gqsv,pvk->gqpsk", G, V)     # unit q of group g placed at p, on the B side
            placed = Z[:, orders, torch.arange(P2, device=perm.device)]       # (P1, n_orders, P2, s1, k)
            energy += placed.sum(2).square().sum((2, 3)).double()
        new = perm.view(P1, P2).gather(1, orders[energy.argmax(1)]).view(-1)
        if torch.equal(new, perm):
            break
        perm = new
    return perm


def permutation_search(terms: list[PermutationTerm], structured: bool = True, svd: str = "exact",
                       max_iters: int = 20, tol: float = 1e-4) -> PermutationSearch:
    """An order of the units along the terms' permuted axes (one order for all of them) that lowers
    their summed Van Loan error: the alternating search from the identity and, with structured=True,
    from the structured start; the better of the two, never worse than the identity. Every term
    must put its units at the same (P1, P2) block positions. tol: the least relative drop of the
    summed error an iteration must bring; svd="randomized": faster for large B, approximate."""
    if not terms:
        raise ValueError("permutation_search needs at least one PermutationTerm")
    for t in terms:
        _check_term(t)
    terms = [PermutationTerm(t.W if t.W.dtype == torch.float64 else t.W.float(), t.a_shape, t.b_shape, t.axis, t.k,
                             t.objective) for t in terms]
    positions = terms[0].positions
    if any(t.positions != positions for t in terms):
        raise ValueError("the matrices of one permutation must put their units at the same block positions, got "
                         + ", ".join(str(t.positions) for t in terms))
    identity = torch.arange(positions[0] * positions[1], device=terms[0].W.device)
    before, approximations = _evaluate(terms, identity, svd)
    if min(positions) == 1:                  # the order only permutes A's or B's rows (columns)
        return PermutationSearch(identity.cpu(), before, before)
    perm, errors, iterations = _alternate(terms, identity, svd, max_iters, tol, (before, approximations))
    found = PermutationSearch(perm, before, errors, iterations, "identity")
    units, ks = [t.units() for t in terms], [t.k for t in terms]
    if structured and any(s > k for M, k in zip(units, ks) for s in M.shape[1:]):
        start = _subspace_start(units, ks, positions, max_iters)
        start = _orient_groups(units, ks, positions, start, max_iters)
        perm, errors, more = _alternate(terms, start, svd, max_iters, tol)
        if sum(errors) < found.total_after:
            found = PermutationSearch(perm, before, errors, iterations + more, "structured")
    found.perm = found.perm.cpu()
    return found


if __name__ == "__main__":
    # `python kronecker.py plan ...`: the planner lives in sizes.py, which imports this file, so
    # the layer must not import it. A fresh interpreter runs sizes.main with the same arguments.
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import sizes; sizes.main(sys.argv[1:], prog='kronecker.py', commands=('plan',))")
    os.execv(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]])
