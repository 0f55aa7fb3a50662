"""
The contractions a KronLinear runs: x (sum_i A_i (x) B_i)^T without the dense weight, chosen by
shape (kron_path), and the helpers that make thin products fast on BLAS. Nothing here knows
about layers or models; kronecker.py builds the layer on top of these.
"""
from __future__ import annotations

import torch

# -----------------------------------------------------------------------------
# Fast paths: x (sum_i A_i (x) B_i)^T without the dense weight

def factored_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], k: int = 1) -> tuple[int, str]:
    """Multiply-adds per input row of the cheaper contraction order, and that order.

    "a_first": U = A X (m1*n1*n2), then U B^T (m1*n2*m2).
    "b_first": V = X B^T (n1*n2*m2), then A V (m1*n1*m2).
    The backward pass mirrors the forward (dX, dA, dB each cost one of the two
    contractions again), so forward+backward costs 3x this, like a dense layer."""
    (m1, n1), (m2, n2) = a_shape, b_shape
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
    (m1, n1), (m2, n2) = a_shape, b_shape
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


