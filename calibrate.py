"""
Calibrated compression: fit the factors of a compressed layer to what the layer computes on
the teacher's own inputs, not to its weight.

Van Loan (kronecker.kron_decompose) and truncated SVD (lowrank.svd_factors) minimise the
weight error ||W - W_hat||_F, which treats every input direction alike. The inputs of a
trained layer are far from isotropic, so it pays to minimise the output error instead:

    ||(W - W_hat) X^T||_F^2 / N = tr(E C E^T),   E = W - W_hat,   C = X^T X / N  (in, in)

where X (N, in) holds the layer's inputs over N calibration tokens. This file has

- the data: deterministic calibration windows of a token file, and the second moment C of
  the inputs of named linear layers, collected by forward pre-hooks (Moments, collect_moments),
- output_error: the one relative output error used everywhere,
- kron_fit: sum_i A_i (x) B_i by alternating least squares on tr(E C E^T), from Van Loan,
- lowrank_fit / shared_basis_fit: U V and C_l B by a whitened SVD (as SVD-LLM),
- calibrated_residual_scores: which entries of W - W_hat a sparse residual should keep.

Damping. A trained layer's C is often nearly singular (a few directions carry most of the
input energy). The output error then barely constrains W_hat along the weak directions, and
a fit is free to put large values there, which hurts on inputs the calibration set did not
show. Every fit here therefore minimises the output error under the damped moment

    C_d = C + damping * mean(diag C) * I,    tr(E C_d E^T) = tr(E C E^T) + damping * mean(diag C) * ||E||_F^2

i.e. the output error plus a small multiple of the weight error. It is one well-defined
objective, so exact alternating steps on it can never raise it. damping -> infinity gives
back the weight-error fits (Van Loan, plain SVD).

Layering: this file imports kronecker (the Van Loan decomposition and the shapes), never
model.py or a script.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from kronecker import b_shape_for, kron_decompose, shape_pair


# -----------------------------------------------------------------------------
# Calibration data

def calibration_windows(tokens: np.ndarray, calib_tokens: int, block_size: int, batch_size: int,
                        progress: bool = True) -> Iterator[torch.Tensor]:
    """Deterministic windows of a 1-D token array (e.g. the np.memmap of a train.bin) covering
    exactly `calib_tokens` tokens, as (batch_size, block_size) int64 batches.

    The windows are calib_tokens // block_size full windows plus, if calib_tokens is not a
    multiple of block_size, one shorter last window (in a batch of its own, since a batch is
    rectangular; the causal model needs no padding for it). They do not overlap and are spread
    evenly over the whole array, the gaps between them all equal up to one token, so a small
    calibration set still samples the whole file. No randomness: the same call gives the same
    windows. The last full batch may hold fewer than batch_size windows. The arguments are
    checked here, before the first batch is asked for."""
    if not isinstance(calib_tokens, (int, np.integer)) or calib_tokens <= 0:
        raise ValueError(f"calib_tokens={calib_tokens!r}: calibration needs a positive number of tokens")
    if calib_tokens > len(tokens):
        raise ValueError(f"calib_tokens={calib_tokens} is more than the {len(tokens)} tokens of the calibration "
                         "data; use a smaller calib_tokens or more data")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be >= 1")
    lengths = [block_size] * (calib_tokens // block_size)
    if calib_tokens % block_size:
        lengths.append(calib_tokens % block_size)
    n = len(lengths)
    gap = len(tokens) - calib_tokens                    # tokens left out, shared evenly between windows
    starts, covered = [], 0
    for i, length in enumerate(lengths):
        starts.append(covered + (i * gap) // max(n - 1, 1))
        covered += length
    # batches of equal-length windows: the full ones, batch_size at a time, then the short one
    full = starts[:calib_tokens // block_size]
    batches = [(full[i:i + batch_size], block_size) for i in range(0, len(full), batch_size)]
    if calib_tokens % block_size:
        batches.append((starts[-1:], lengths[-1]))
    return _read_windows(tokens, batches, progress)


def _read_windows(tokens: np.ndarray, batches: list[tuple[list[int], int]], progress: bool) -> Iterator[torch.Tensor]:
    for batch, length in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
        rows = np.stack([np.asarray(tokens[s:s + length]) for s in batch]).astype(np.int64)
        yield torch.from_numpy(rows)


class Moments:
    """The uncentred second moment C = (1/N) sum_n x_n x_n^T of one layer's inputs x (in,),
    accumulated in float64 over any number of batches (the bias does not enter the output
    error, so the moment is not centred)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of x (..., in)."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def second_moment(self) -> torch.Tensor:
        """C (in, in) float64, on the device the inputs came from."""
        if self.count == 0:
            raise ValueError("no inputs were collected for this layer: it did not run during calibration")
        return self.sum / self.count


class _AllSeen(Exception):
    """Raised by a hook to end a forward pass once every hooked layer has had its input."""


@torch.no_grad()
def collect_moments(model: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor],
                    stop_early: bool = True,
                    forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> dict[str, Moments]:
    """The input second moments of the submodules `names` of `model` (nn.Linear or any layer
    taking its input as the first argument) over `batches` of token ids (B, T).

    The model runs in eval mode (restored afterwards) without gradients; each batch is moved to
    the device of the model's first parameter. `forward(model, idx)` runs one batch (default:
    model(idx)). With stop_early, a forward pass ends as soon as every named layer has received
    its input, so layers after the last one (and the output head) never run; this assumes each
    named layer runs at most once per forward pass, as every layer of a GPT does.
    The hooks are removed afterwards, also on an error.

    Sequential calibration (each layer calibrated on the inputs that the already-compressed
    earlier layers produce) is the caller's loop over this function: compress layer i, then
    collect the moments of layer i+1 in the same, partly compressed model. stop_early makes
    each of those calls run only up to the layer it collects for.

    A layer must read its input in the standard feature order: a KronLinear with swap_in (see
    kronecker.swap_hidden_order) sees its input permuted and is refused."""
    names = list(names)
    if not names:
        raise ValueError("collect_moments needs at least one layer name")
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if getattr(module, "swap_in", False):
            raise ValueError(f"{name} reads its input in the swapped feature order (swap_in); collect the moments "
                             "of a dense layer, or of a KronLinear with swap_in=False")
    device = next(model.parameters()).device
    moments: dict[str, Moments] = {}
    seen: set[str] = set()

    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in moments:
                moments[name] = Moments(x.shape[-1], x.device)
            moments[name].update(x)
            seen.add(name)
            if stop_early and len(seen) == len(modules):
                raise _AllSeen
        return pre_hook

    was_training = model.training
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        model.eval()
        for idx in batches:
            seen.clear()
            try:
                (forward or (lambda m, i: m(i)))(model, idx.to(device))
            except _AllSeen:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name in names if name not in moments]
    if missing:
        raise ValueError(f"no inputs were collected for {missing}: they did not run during calibration "
                         "(no batches, or layers the forward pass does not use)")
    return moments


@torch.no_grad()
def collect_cross_moments(teacher: nn.Module, student: nn.Module, name: str,
                          batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For the layer `name` of two models of one layout run on the same batches: the student's
    input second moment C~ = E[x~ x~^T] and the cross moment X = E[x x~^T] with the teacher's
    input x at the same place, both (in, in) in float64. Sequential calibration fits the
    student's layer to the teacher's outputs W x through them (teacher_target). Both models run
    in eval mode without gradients, each only up to that layer; the hooks go afterwards."""
    captured: dict[str, torch.Tensor] = {}

    def run(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            captured["x"] = args[0].reshape(-1, args[0].shape[-1]).double()
            raise _AllSeen
        handle = model.get_submodule(name).register_forward_pre_hook(pre_hook)
        was_training = model.training
        try:
            model.eval()
            model(idx.to(next(model.parameters()).device))
        except _AllSeen:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        return captured.pop("x")

    C, X, n = 0, 0, 0
    for idx in batches:
        x, x_student = run(teacher, idx), run(student, idx)
        C = C + x_student.t() @ x_student
        X = X + x.t() @ x_student
        n += x.shape[0]
    if n == 0:
        raise ValueError(f"no inputs were collected for {name}: no calibration batches")
    return C / n, X / n


def teacher_target(W: torch.Tensor, C: torch.Tensor, X: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """The weight W' whose fit on the student's inputs (second moment C) is the fit to the
    teacher's outputs: min ||W_hat x~ - W x||^2 + mu ||W_hat - W||^2 over the calibration set
    equals min tr((W_hat - W') C_d (W_hat - W')^T) + const with C_d = C + mu I (the damping every
    fit here uses) and W' = W (X + mu I) C_d^-1, X = E[x x~^T]. Where the student sees what the
    teacher sees (X = C), W' = W. (out, in), in W's dtype."""
    _check_moment(C, W.shape[1])
    Cd = damped(C, damping)
    mu = Cd[0, 0] - C.double()[0, 0]
    T = W.double() @ (X.to(Cd) + mu * torch.eye(Cd.shape[0], dtype=Cd.dtype, device=Cd.device))
    return torch.linalg.solve(Cd, T.t()).t().to(W.dtype)        # T C_d^-1, C_d symmetric


# -----------------------------------------------------------------------------
# The output error

def damped(C: torch.Tensor, damping: float) -> torch.Tensor:
    """C + damping * mean(diag C) * I in float64 (see the damping note at the top)."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    C = C.double()
    if damping == 0:
        return C
    return C + damping * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, C: torch.Tensor) -> float:
    """The relative output error sqrt(tr(E C E^T) / tr(W C W^T)), E = W - W_hat: the relative
    error ||(W - W_hat) X^T|| / ||W X^T|| of the layer's outputs over the calibration inputs
    (C = X^T X / N). W, W_hat (out, in), C (in, in)."""
    W = W.double()
    E = W - W_hat.to(W)
    C = C.to(W)
    num = ((E @ C) * E).sum()
    den = ((W @ C) * W).sum()
    return (num.clamp_min(0) / den.clamp_min(1e-300)).sqrt().item()


def _check_moment(C: torch.Tensor, in_features: int) -> None:
    if tuple(C.shape) != (in_features, in_features):
        raise ValueError(f"the input moment C has shape {tuple(C.shape)}; a weight with {in_features} inputs "
                         f"needs ({in_features}, {in_features})")


# -----------------------------------------------------------------------------
# Kronecker factors by alternating least squares
#
# Index a weight as W[(i, a), (j, b)] with i < m1, a < m2 (its rows) and j < n1, b < n2 (its
# columns), so that (A (x) B)[(i, a), (j, b)] = A[i, j] B[a, b]. With C4 = C viewed as
# (n1, n2, n1, n2) and G = W C viewed as (m1, m2, n1, n2), the output error of
# W_hat = sum_s A_s (x) B_s is
#
#     tr(W C W^T) - 2 sum_s <A_s, R_s> + sum_{s,t} <A_s^T A_t, H_st>
#     R_s[i, j]  = sum_{a,b} G[i, a, j, b] B_s[a, b]                     (m1, n1)
#     H_st[j, k] = sum_{b,q} (B_s^T B_t)[b, q] C4[j, b, k, q]             (n1, n1)
#
# For fixed B this is a quadratic in A whose Hessian is the same for every row i of A: with
# the k factors side by side, Abar (m1, k*n1), Rbar (m1, k*n1) and H (k*n1, k*n1) built from
# the blocks H_st, the minimiser is Abar = Rbar H^-1. The same holds for B with the roles of
# (i, j) and (a, b) swapped. With C = I, H_st = <B_s, B_t> I and the step is one step of the
# power (subspace) iteration on Van Loan's rearranged matrix, whose fixed point is Van Loan's.

def _spd_solve(H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X = R H^-1 for a symmetric positive semi-definite H (p, p) and R (rows, p): by Cholesky,
    or by the pseudo-inverse where H is singular (a zero factor, or damping=0 on a singular C)."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        return torch.cholesky_solve(R.t(), L).t()
    return R @ torch.linalg.pinv(H, hermitian=True)


def _moment_layouts(C: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C4 in the two layouts the steps contract it in, each copied once: (n2*n2, n1*n1) indexed
    [(b, q), (j, k)] for A's H, and (n1*n1, n2*n2) indexed [(j, k), (b, q)] for B's. Every step
    is then one matrix product instead of a strided copy of the whole moment."""
    C4 = C.view(n1, n2, n1, n2)
    return (C4.permute(1, 3, 0, 2).reshape(n2 * n2, n1 * n1).contiguous(),
            C4.permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2).contiguous())


def _normal_A(G: torch.Tensor, C_for_A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations for A given B (k, m2, n2): R (k, m1, n1) and H (k, n1, k, n1)."""
    k, n1 = B.shape[0], G.shape[2]
    R = torch.einsum("iajb,sab->sij", G, B)
    BB = torch.einsum("sab,taq->stbq", B, B)                       # B_s^T B_t
    H = (BB.reshape(k * k, -1) @ C_for_A).view(k, k, n1, n1)        # H[s, t, j, k]
    return R, H.permute(0, 2, 1, 3)


def _normal_B(G: torch.Tensor, C_for_B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations for B given A (k, m1, n1): R (k, m2, n2) and H (k, n2, k, n2)."""
    k, n2 = A.shape[0], G.shape[3]
    R = torch.einsum("iajb,sij->sab", G, A)
    AA = torch.einsum("sij,tik->stjk", A, A)                       # A_s^T A_t
    H = (AA.reshape(k * k, -1) @ C_for_B).view(k, k, n2, n2)        # H[s, t, b, q]
    return R, H.permute(0, 2, 1, 3)


def _solve(R: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The factors (k, rows, p) solving the normal equations R (k, rows, p), H (k, p, k, p):
    all k side by side, Fbar = Rbar H^-1."""
    k, rows, p = R.shape
    F = _spd_solve(H.reshape(k * p, k * p), R.permute(1, 0, 2).reshape(rows, k * p))
    return F.view(rows, k, p).permute(1, 0, 2)


def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each pair to ||A_s|| = ||B_s|| (A_s (x) B_s is unchanged), as Van Loan's
    sqrt(singular value) split: alternating steps would otherwise let the scale drift to one side."""
    a = A.flatten(1).norm(dim=1)
    b = B.flatten(1).norm(dim=1)
    root = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
    return A * root.view(-1, 1, 1), B / root.view(-1, 1, 1)


def kron_fit(W: torch.Tensor, C: torch.Tensor, a_shape: tuple[int, int], k: int = 1, *, iters: int = 20,
             damping: float = 1e-2, init: tuple[torch.Tensor, torch.Tensor] | None = None,
             tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """W (out, in) ~ sum_{s<k} A_s (x) B_s minimising the output error tr(E C_d E^T) over the
    damped input moment C_d (see the top of the file), by alternating exact least-squares
    steps for all k A's jointly, then all k B's, starting from Van Loan (or `init`: A, B).

    W: (m1*m2, n1*n2); C: (in, in), the input second moment; a_shape (m1, n1); B is (m2, n2).
    Returns A (k, m1, n1), B (k, m2, n2) in W's dtype (the work is float64), each pair with
    ||A_s|| = ||B_s||, and history: history[0] the relative output error (output_error, on the
    undamped C) of the start, history[t] that of the best factors after iteration t.

    Each step minimises the damped objective exactly, so that one never rises; the returned
    factors are the iterate with the lowest true (undamped) output error, which history follows,
    so history never rises either, and kron_fit is never worse than its start. It stops after
    `iters` iterations or once an iteration lowers the damped objective by less than `tol`
    (relative). Per-factor scalars add nothing to this fit: a KronLinear with scalars takes
    these factors with s = 1, and no vl-norm rescaling (it would undo the least-squares scale)."""
    m1, n1 = shape_pair(a_shape)
    m2, n2 = b_shape_for(tuple(W.shape), a_shape, k)                 # validates a_shape and k
    _check_moment(C, W.shape[1])
    if iters < 0:
        raise ValueError(f"iters={iters} must be >= 0")
    W64, C = W.double(), C.to(device=W.device, dtype=torch.float64)
    mu = damping * C.diagonal().mean()                        # the damping's weight-error weight
    Cd = damped(C, damping)
    Gd = (W64 @ Cd).view(m1, m2, n1, n2)
    C_for_A, C_for_B = _moment_layouts(Cd, n1, n2)
    W4 = W64.view(m1, m2, n1, n2)
    trW_Cd = (Gd * W4).sum()
    trW_C = trW_Cd - mu * W64.square().sum()

    if init is None:
        A, B = kron_decompose(W64, (m1, n1), k)
    else:
        A, B = (t.detach().to(W64) for t in init)
        if tuple(A.shape) != (k, m1, n1) or tuple(B.shape) != (k, m2, n2):
            raise ValueError(f"init must be A {(k, m1, n1)} and B {(k, m2, n2)}, got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")

    def errors(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
        """(damped objective, true relative output error) of A, B, given R, H = _normal_B(.., A):
        both from the expansion above (in B's terms), without forming E C."""
        BB = torch.einsum("sab,taq->sbtq", B, B).reshape(H.shape)
        obj = (trW_Cd - 2 * (R * B).sum() + (BB * H).sum()).clamp_min(0)
        # ||E||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2: the damping's share of obj
        cross = torch.einsum("iajb,sij,sab->", W4, A, B)
        gram = (A.flatten(1) @ A.flatten(1).t()) * (B.flatten(1) @ B.flatten(1).t())
        weight_err = (W64.square().sum() - 2 * cross + gram.sum()).clamp_min(0)
        true = (obj - mu * weight_err).clamp_min(0)
        return obj.item(), (true / trW_C.clamp_min(1e-300)).sqrt().item()

    objective, best_err = errors(A, B, *_normal_B(Gd, C_for_B, A))
    best = (A, B)
    history = [best_err]
    for _ in range(iters):
        A = _solve(*_normal_A(Gd, C_for_A, B))
        R, H = _normal_B(Gd, C_for_B, A)
        B = _solve(R, H)
        new_objective, err = errors(A, B, R, H)
        A, B = _balance(A, B)
        if err < best_err:
            best, best_err = (A, B), err
        history.append(best_err)
        if objective - new_objective <= tol * objective:
            break
        objective = new_objective
    A, B = best
    return A.to(W.dtype), B.to(W.dtype), history


# -----------------------------------------------------------------------------
# Low rank by a whitened SVD
#
# With C_d = S S^T (Cholesky), tr(E C_d E^T) = ||E S||_F^2, so the best W_hat of rank r in the
# output error is the truncated SVD of W S, mapped back: W S ~ U_r diag(s_r) V_r^T gives
# W_hat = U_r diag(s_r) V_r^T S^-1 (the idea of SVD-LLM). Its error is the tail of the
# singular values of W S, as the plain SVD's is the tail of those of W.

def _whitening(C: torch.Tensor, damping: float) -> torch.Tensor:
    """The lower Cholesky factor S of the damped moment: C_d = S S^T (float64)."""
    S, info = torch.linalg.cholesky_ex(damped(C, damping))
    if info.item() != 0:
        raise ValueError("the input moment C is singular (or not symmetric positive semi-definite): "
                         "use damping > 0")
    return S


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r) = U_r sqrt(s_r) and V (r, p) = sqrt(s_r) Vh_r, as lowrank.svd_factors splits the
    singular values; ranks above the number of singular values are padded with zeros."""
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    Uf, Vf = U[:, :r] * root, root[:, None] * Vh[:r]
    if r < rank:
        Uf = torch.cat([Uf, Uf.new_zeros(Uf.shape[0], rank - r)], dim=1)
        Vf = torch.cat([Vf, Vf.new_zeros(rank - r, Vf.shape[1])], dim=0)
    return Uf, Vf


def lowrank_fit(W: torch.Tensor, C: torch.Tensor, rank: int,
                damping: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) ~ U V of rank `rank`, minimising the output error under the damped moment
    C_d = C + damping * mean(diag C) * I (C: (in, in)): the exact optimum, by a whitened SVD.

    Returns U (out, r) and V (r, in) in W's dtype, the singular values of W S split as
    sqrt into each (lowrank.svd_factors' convention): LowRankLinear's U and V. With C = I this
    is svd_factors(W, rank)."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    _check_moment(C, W.shape[1])
    S = _whitening(C.to(W.device), damping)
    U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
    Uf, Vf = _split(U, s, Vh, rank)
    V = torch.linalg.solve_triangular(S, Vf, upper=False, left=False)      # Vf S^-1
    return Uf.to(W.dtype), V.to(W.dtype)


def shared_basis_fit(weights: list[torch.Tensor], moments: list[torch.Tensor], rank: int,
                     damping: float = 1e-2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A group of layers W_l (out_l, in) ~ K_l B sharing one basis B (r, in), minimising the
    summed output error sum_l tr(E_l C_l E_l^T) of the members, each over its own input
    moment C_l (in, in) (damped as everywhere here).

    The members see different inputs (different layers), so the joint problem has no closed
    form. The natural whitened extension of init_shared_group's stacked SVD:
    1. the basis: the exact optimum under the members' mean moment C_bar, i.e. the whitened SVD
       of the stack [W_1; W_2; ...] S (C_bar_d = S S^T), split as svd_factors splits it;
    2. each member's coefficients: the exact least-squares fit for that basis on its own
       moment, K_l = W_l C_l B^T (B C_l B^T)^-1, which can only lower each member's error.
    With equal moments step 2 changes nothing and the result is the exact optimum; with C_l = I
    it is init_shared_group's SVD of the stack.

    Returns the coefficients [K_l (out_l, r)] and the basis B (r, in), in the weights' dtype:
    SharedBasisLinear's coefficient and basis."""
    if len(weights) != len(moments) or not weights:
        raise ValueError(f"shared_basis_fit needs one moment per weight, got {len(weights)} weights "
                         f"and {len(moments)} moments")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    in_features = weights[0].shape[1]
    for W, C in zip(weights, moments):
        if W.shape[1] != in_features:
            raise ValueError("the members of a shared basis need the same input size, got "
                             f"{[tuple(W.shape) for W in weights]}")
        _check_moment(C, in_features)
    moments = [C.to(device=weights[0].device, dtype=torch.float64) for C in moments]
    S = _whitening(sum(moments) / len(moments), damping)
    stacked = torch.cat([W.double() for W in weights], dim=0) @ S             # (sum of out, in)
    U, s, Vh = torch.linalg.svd(stacked, full_matrices=False)
    _, Vf = _split(U, s, Vh, rank)
    basis = torch.linalg.solve_triangular(S, Vf, upper=False, left=False)     # (r, in)
    coefficients = []
    for W, C in zip(weights, moments):
        Cd = damped(C, damping)
        # K (B C_d B^T) = W C_d B^T; _spd_solve handles a basis padded with zero rows
        coefficients.append(_spd_solve(basis @ Cd @ basis.t(), W.double() @ Cd @ basis.t()).to(W.dtype))
    return coefficients, basis.to(weights[0].dtype)


# -----------------------------------------------------------------------------
# A sparse residual chosen on the calibrated error

def calibrated_residual_scores(E: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """How much each entry of the residual E = W - W_hat (out, in) adds to the output error:
    |E_ij| * sqrt(C_jj), the size of its contribution E_ij x_j over the calibration inputs (as
    Wanda scores weights). It is exact when the inputs are uncorrelated (C diagonal) and ignores
    the correlations otherwise. A sparse residual keeps the entries of the largest scores
    (instead of the largest |E_ij|, which is the choice for the weight error). Returns (out, in)
    float32 scores."""
    _check_moment(C, E.shape[1])
    return (E.double().abs() * C.to(E.device).double().diagonal().clamp_min(0).sqrt()).float()
