"""
Free permutations before Van Loan: the same dense GPT, reordered where that costs nothing, so
that its MLP matrices are closer to sums of Kronecker products.

- the search over one axis of a set of matrices (alternating Van Loan with a linear assignment,
  from the identity and from a structured start),
- applying an order to a dense GPT: one MLP's hidden units, or the residual stream of every
  layer at once,
- the search over a whole GPT (hidden and residual orders alternating).

compress.py says which matrices are searched for (a list of KronTerm) and applies the result
before it compresses.
"""
from __future__ import annotations

import itertools
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from kronecker import b_shape_for, check_factors, kron_approximation, rel_error, relative_error
from model import GPT, LINEAR_NAMES

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



# -----------------------------------------------------------------------------
# The alternating search: Van Loan at a fixed order, then the best order for fixed factors

def _evaluate(terms: list[PermutationTerm], perm: torch.Tensor,
              svd: str = "exact") -> tuple[list[float], list[torch.Tensor]]:
    """Decompose every matrix at the order `perm`: relative errors and approximations."""
    errors, approximations = [], []
    for t in terms:
        W = t.W.index_select(t.axis, perm)
        W_hat = kron_approximation(W, t.a_shape, t.k, t.objective, svd)
        errors.append(rel_error(W, W_hat))
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



# -----------------------------------------------------------------------------
# A dense GPT, reordered

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


@dataclass(frozen=True)
class Searched:
    """One MLP matrix the search lowers the error of: block `layer`'s `name` ("mlp.c_fc" or
    "mlp.c_proj"), to be decomposed with A of a_shape into k factors by `objective`."""
    layer: int
    name: str
    a_shape: tuple[int, int]
    k: int = 1
    objective: str = "vl-norm"


def permutation_terms(model: GPT, searched: list[Searched], hidden_of: int | None) -> list[PermutationTerm]:
    """The PermutationTerms of the `searched` matrices of layer `hidden_of` (its hidden units:
    c_fc's rows, c_proj's columns) or of every layer (hidden_of=None: the residual stream, c_fc's
    columns, c_proj's rows)."""
    terms = []
    for s in searched:
        if hidden_of is not None and s.layer != hidden_of:
            continue
        W = model.transformer.h[s.layer].get_submodule(s.name).weight.detach().float()
        hidden_axis = 0 if s.name == "mlp.c_fc" else 1
        axis = hidden_axis if hidden_of is not None else 1 - hidden_axis
        b = b_shape_for(tuple(W.shape), s.a_shape, s.k)
        terms.append(PermutationTerm(W, s.a_shape, b, axis, s.k, s.objective))
    return terms


def search_permutations(model: GPT, searched: list[Searched], residual: bool, svd: str = "exact",
                        max_rounds: int = 10, tol: float = 1e-4) -> Permutations:
    """Orders for every MLP's hidden units (and, with residual, the residual stream) that lower the
    summed Van Loan error of the `searched` matrices. The hidden and residual
    searches alternate, each from the order the other left, while the sum drops by more than tol
    (relative); the first round runs the one that gains more first (an order found while the other
    axis is still shuffled would hide the structure from it). `model` is not changed."""
    return _search_permutations_(deepcopy(model), searched, residual, svd, max_rounds, tol)


def _search_permutations_(work: GPT, searched: list[Searched], residual: bool, svd: str = "exact",
                          max_rounds: int = 10, tol: float = 1e-4) -> Permutations:
    """search_permutations on `work` itself: it ends permuted by the orders returned."""
    c = work.config
    n = c.n_layer
    found = Permutations([torch.arange(4 * c.n_embd) for _ in range(n)], torch.arange(c.n_embd))

    def total() -> float:
        return sum(relative_error(t.W, t.a_shape, t.k, t.objective, svd)
                   for i in range(n) for t in permutation_terms(work, searched, i))

    def hidden(structured: bool) -> tuple[float, list]:
        results = [permutation_search(terms, structured, svd) if terms else None
                   for terms in (permutation_terms(work, searched, i) for i in range(n))]
        return sum(r.total_before - r.total_after for r in results if r), results

    def apply_hidden(results) -> None:
        for i, r in enumerate(results):
            if r is not None:
                permute_hidden_(work, i, r.perm)
                found.hidden[i] = found.hidden[i][r.perm]

    def search_residual(structured: bool):
        terms = permutation_terms(work, searched, None)
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


def permuted(model: GPT, searched: list[Searched], residual: bool, svd: str = "exact") -> GPT:
    """A copy of the dense `model` with its MLP hidden units (and, with residual, its residual
    stream) reordered so that the Van Loan approximations of the `searched` matrices lose less.
    The same function: the permutations are free, at init and at run time."""
    new = deepcopy(model)
    _search_permutations_(new, searched, residual, svd)
    return new
