"""
Kronecker factors and the layer built from them:

- the shapes: which A (m1, n1) and B (m2, n2) tile a weight,
- the Van Loan-Pitsianis decomposition  W ~ sum_i A_i (x) B_i  (Frobenius-optimal), and the
  relative error of an approximation (the one formula every report uses),
- KronLinear: a linear layer whose weight is sum_i s_i A_i (x) B_i, applied without ever
  materialising the full weight (plus an optional sparse residual),
- the initialisations of the Krony-PT paper (vl, vl-norm, prune, random).

The contractions KronLinear runs are in kron_kernels.py; the search for free permutations in
permute.py. `python kronecker.py plan` lists the valid shapes with their model sizes (sizes.py).

Conventions. A weight W has the nn.Linear layout (out, in). With A of shape
(m1, n1) and B of shape (m2, n2), out = m1*m2 and in = n1*n2, and the
Kronecker product is the block matrix whose (i1, j1) block is A[i1, j1] * B:

    (A (x) B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] * B[i2, j2]

which is exactly torch.kron(A, B). Viewing an input vector x of length n1*n2
as an (n1, n2) matrix X (row-major), (A (x) B) x = vec(A X B^T).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from kron_kernels import (factored_macs, kron_matmul_a_first, kron_matmul_b_first, kron_matmul_bmm, kron_path,
                          swap_order)

INITS = ("vl", "vl-norm", "prune", "random")
SVD_METHODS = ("exact", "randomized")

# -----------------------------------------------------------------------------
# Shapes

def shape_pair(shape, what: str = "kron_shape", sides: str = "(m1, n1)", where: str = "",
               positive: bool = False) -> tuple[int, int]:
    """`shape` as a pair of ints (positive ones with `positive`; otherwise a side of 0 is left to
    other_factor, which lists the valid sides), or a ValueError naming `what` (kron_shape for A,
    B shape for B) after `where`: the one check of a factor shape, whoever wrote it."""
    try:
        pair = tuple(int(s) for s in shape)
        whole = all(float(s) == int(s) for s in shape)
    except (TypeError, ValueError):
        pair, whole = (), False
    if len(pair) != 2 or not whole or (positive and min(pair) < 1):
        raise ValueError(f"{where}{what}={shape!r} must be a pair of positive integers {sides}, e.g. (2, 2)")
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
        self.frozen_weight: torch.Tensor | None = None      # set by frozen()
        # feature orders (see swap_order and swap_hidden_order): False is the standard order of
        # nn.Linear. Only the order of activations changes; the parameters keep theirs.
        self.swap_in = False
        self.swap_out = False
        self.init_random(0.02)

    def extra_repr(self) -> str:
        swaps = "".join(f", {name}=True" for name in ("swap_in", "swap_out") if getattr(self, name))
        return (f"in={self.in_features}, out={self.out_features}, A={self.a_shape}, B={self.b_shape}, "
                f"k={self.k}, scalars={self.scalars is not None}, bias={self.bias is not None}{swaps}")

    @contextlib.contextmanager
    def frozen(self):
        """Within this block, a layer on the materialised path builds W once instead of on every
        forward without gradients. Decoding needs it: rebuilding W for each new token would make
        Krony-92M (4 factors) slower than dense GPT-2 (GPT.generate enters it). The factors must
        not change inside the block; forwards that need gradients still use the live factors."""
        outer = self.frozen_weight                 # blocks may nest
        try:
            if self.path == "materialised":
                with torch.no_grad():
                    self.frozen_weight = self.materialize()
            yield self
        finally:
            self.frozen_weight = outer

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
    def init_from_residual(self, R: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Keep the nnz entries of the residual R (out, in) of the largest magnitude, or of the
        largest `scores` (out, in) where given (calibration: what each entry adds to the output)."""
        nnz = self.values.numel()
        flat = R.reshape(-1)
        rank = (flat.abs() if scores is None else scores.reshape(-1))
        keep = rank.topk(nnz, sorted=False).indices.sort().values   # row-major order: coalesced
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
# Layer pairs and decoding

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
    """KronLinear.frozen() for every Kronecker layer of `model` (any callable: evaluation accepts
    stubs; only an nn.Module can hold KronLinear layers)."""
    modules = model.modules() if isinstance(model, nn.Module) else []
    with contextlib.ExitStack() as stack:
        for m in modules:
            if isinstance(m, KronLinear):
                stack.enter_context(m.frozen())
        yield model



def kron_approximation(W: torch.Tensor, a_shape: tuple[int, int], k: int = 1,
                       objective: str = "vl-norm", svd: str = "exact") -> torch.Tensor:
    """The dense init a compression would start from: the Van Loan sum of k products,
    scaled by alpha = ||W|| / ||W_hat|| for "vl-norm" (as KronLinear.init_from_weight)."""
    W_hat = kron_sum(*kron_decompose(W, a_shape, k, method=svd))
    if objective == "vl-norm":
        W_hat = W_hat * (W.norm() / W_hat.norm().clamp_min(1e-12))
    return W_hat


def rel_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F (in at least float32): the one relative weight error every report uses."""
    W, W_hat = (t if t.dtype == torch.float64 else t.float() for t in (W, W_hat))
    return ((W - W_hat).norm() / W.norm().clamp_min(1e-12)).item()


def relative_error(W: torch.Tensor, a_shape: tuple[int, int], k: int = 1, objective: str = "vl-norm",
                   svd: str = "exact") -> float:
    """rel_error of the objective's approximation of W (Van Loan, or vl-norm's rescaled one)."""
    W = W if W.dtype == torch.float64 else W.float()
    return rel_error(W, kron_approximation(W, a_shape, k, objective, svd))


if __name__ == "__main__":
    # `python kronecker.py plan ...` runs the planner (sizes.py, a script above this layer)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sizes.py")
    os.execv(sys.executable, [sys.executable, script, *sys.argv[1:]])
