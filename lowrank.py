"""
The low-rank family, the baselines Kronecker factors are compared against:

- LowRankLinear:      W ~ U V with U (out, r), V (r, in), initialised by truncated SVD,
- SharedBasisLinear:  W_l ~ C_l B for a group of layers l sharing one basis B (r, in)
                      (seeds/002's ShareLinear idea, "Basis Sharing"), initialised from
                      the SVD of the group's weights stacked along the output dimension,
- the equal-size rank: the rank r whose parameter count matches a Kronecker configuration,
- two commands:

    python lowrank.py plan-rank --kron-shape 1536 384       # rank matching a Kronecker size
    python lowrank.py count --targets '[{"pattern": "mlp.*", "layers": "odd", "method": "kron",
                                         "kron_shape": [1536, 384]}]'   # sizes of a setup

Why stack along the output dimension: every member of a group maps the same
kind of input (the residual stream for c_fc and attn.*, the 4*n_embd hidden
for mlp.c_proj), so one basis B projects the input to r features and each layer
keeps its own coefficients C_l (out, r) that read them. Stacking the weights
[W_1; W_2; ...] (G*out, in) = U S V^T gives B = sqrt(S_r) V_r^T and
C_l = (U_r sqrt(S_r)) restricted to member l's rows: the best rank-r
approximation of the stack, so at full rank min(G*out, in) every member is exact.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kronecker import b_shape_for, gpt_param_count, sparse_count


# -----------------------------------------------------------------------------
# Truncated SVD

def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) ~ U V, U = U_r sqrt(S_r) (out, r), V = sqrt(S_r) V_r^T (r, in): the
    Frobenius-optimal rank-r approximation (Eckart-Young), sqrt(S) into each factor so
    that the two stay balanced in scale. Ranks above min(out, in) are padded with zeros."""
    work = W if W.dtype == torch.float64 else W.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    Uf, Vf = U[:, :r] * root, root[:, None] * Vh[:r]
    if r < rank:        # more rank than the matrix has: the extra directions start at zero
        Uf = F.pad(Uf, (0, rank - r))
        Vf = F.pad(Vf, (0, 0, 0, rank - r))
    return Uf.to(W.dtype), Vf.to(W.dtype)


class LowRankLinear(nn.Module):
    """y = x W^T + b with W = U V, applied as two thin GEMMs (x V^T) U^T.

    Parameters: U (out, r), V (r, in), optional bias (out,)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if rank is None or rank < 1:
            raise ValueError(f"low-rank layers need a rank >= 1 (lowrank_rank), got {rank!r}; "
                             "see `python lowrank.py plan-rank` for the rank matching a Kronecker size")
        self.in_features, self.out_features, self.rank = in_features, out_features, int(rank)
        self.U = nn.Parameter(torch.empty(out_features, self.rank))
        self.V = nn.Parameter(torch.empty(self.rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.U, std=0.02)
        nn.init.normal_(self.V, std=0.02)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"

    def materialize(self) -> torch.Tensor:
        """The dense weight U V, shape (out, in)."""
        return self.U @ self.V

    def macs_per_row(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    @torch.no_grad()
    def init_from_weight(self, W: torch.Tensor) -> None:
        """Truncated SVD of W (out, in)."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(W.shape)} does not fit LowRankLinear "
                             f"(out={self.out_features}, in={self.in_features})")
        U, V = svd_factors(W, self.rank)
        self.U.copy_(U)
        self.V.copy_(V)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.init_from_weight(linear.weight.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer


class SharedBasisLinear(nn.Module):
    """y = (x B^T) C^T + b: a basis B (r, in), possibly the same tensor in several
    layers (tie_bases), and this layer's own coefficients C (out, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if rank is None or rank < 1:
            raise ValueError(f"shared-basis layers need a basis size >= 1 (lowrank_rank), got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, int(rank)
        self.basis = nn.Parameter(torch.empty(self.rank, in_features))
        self.coefficient = nn.Parameter(torch.empty(out_features, self.rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.basis, std=0.02)
        nn.init.normal_(self.coefficient, std=0.02)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, basis={self.rank}, out={self.out_features}, bias={self.bias is not None}"

    def materialize(self) -> torch.Tensor:
        """The dense weight C B, shape (out, in)."""
        return self.coefficient @ self.basis

    def macs_per_row(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis), self.coefficient, self.bias)


def tie_bases(members: list[SharedBasisLinear]) -> None:
    """Make every member use the first one's basis tensor (like weight tying: the
    state dict lists it under each name, parameters() and num_params count it once)."""
    for m in members[1:]:
        if (m.rank, m.in_features) != (members[0].rank, members[0].in_features):
            raise ValueError("layers sharing a basis need the same rank and input size, got "
                             f"{(members[0].rank, members[0].in_features)} and {(m.rank, m.in_features)}")
        m.basis = members[0].basis


@torch.no_grad()
def init_shared_group(members: list[SharedBasisLinear], weights: list[torch.Tensor]) -> None:
    """SVD of the group's weights stacked along the output dimension (G*out, in):
    the shared basis is sqrt(S_r) V_r^T, each member's coefficients its rows of U_r sqrt(S_r)."""
    if len({id(m.basis) for m in members}) != 1:
        raise ValueError("init_shared_group: the members do not share one basis; call tie_bases first")
    stacked = torch.cat([w.detach() for w in weights], dim=0)          # (sum of out, in)
    C, B = svd_factors(stacked, members[0].rank)                        # (sum of out, r), (r, in)
    members[0].basis.copy_(B)
    for m, c in zip(members, C.split([w.shape[0] for w in weights], dim=0)):
        m.coefficient.copy_(c)


# -----------------------------------------------------------------------------
# Sizes at equal parameter count

def kron_matrix_params(shape: tuple[int, int], a_shape: tuple[int, int], k: int = 1,
                       scalars: bool = False, sparse: float = 0.0) -> int:
    """Trainable parameters of one KronLinear weight (out, in): k (m1 n1 + m2 n2) [+ k scalars]
    [+ the sparse residual's values]."""
    m2, n2 = b_shape_for(shape, a_shape, k)
    return k * (a_shape[0] * a_shape[1] + m2 * n2 + (1 if scalars else 0)) + sparse_count(shape, sparse)


def shared_groups_sizes(n_members: int, group: int) -> list[int]:
    """Consecutive groups of `group` members; the last one may be smaller."""
    return [min(group, n_members - i) for i in range(0, n_members, group)]


def lowrank_cost_per_rank(shapes: list[tuple[int, int]]) -> int:
    """Parameters one unit of rank costs over these matrices: sum of (out + in)."""
    return sum(o + i for o, i in shapes)


def shared_cost_per_rank(shape: tuple[int, int], n_members: int, group: int) -> int:
    """One unit of basis size over n_members matrices of `shape` in groups of `group`:
    each group pays `in` once for the basis and `out` per member for the coefficients."""
    out_f, in_f = shape
    return sum(in_f + g * out_f for g in shared_groups_sizes(n_members, group))


def matching_rank(budget: int, cost_per_rank: int) -> int:
    """The largest rank whose parameters do not exceed `budget` (parameters are linear in the rank)."""
    return budget // cost_per_rank


@dataclass
class MatchedRanks:
    budget: int          # MLP weight parameters of the Kronecker configuration (all layers)
    lowrank_rank: int    # largest rank of "lowrank" within the budget
    lowrank_cost: int    # parameters per unit of rank
    shared_rank: int     # largest basis size of "shared" within the budget
    shared_cost: int


def match_mlp_ranks(a_shape: tuple[int, int], k: int = 1, scalars: bool = False, sparse: float = 0.0,
                    group: int = 2, n_embd: int = 768, n_layer: int = 12) -> MatchedRanks:
    """Ranks at equal size to Kronecker MLPs (A shape for c_fc, c_proj transposed), every layer."""
    d = n_embd
    fc, proj = (4 * d, d), (d, 4 * d)
    a_shape = (int(a_shape[0]), int(a_shape[1]))
    budget = n_layer * (kron_matrix_params(fc, a_shape, k, scalars, sparse)
                        + kron_matrix_params(proj, a_shape[::-1], k, scalars, sparse))
    lowrank_cost = lowrank_cost_per_rank([fc, proj] * n_layer)
    shared_cost = shared_cost_per_rank(fc, n_layer, group) + shared_cost_per_rank(proj, n_layer, group)
    return MatchedRanks(budget, matching_rank(budget, lowrank_cost), lowrank_cost,
                        matching_rank(budget, shared_cost), shared_cost)


def plan_rank(a_shape: tuple[int, int], k: int = 1, scalars: bool = False, sparse: float = 0.0,
              group: int = 2, n_embd: int = 768, n_layer: int = 12, vocab: int = 50257,
              block_size: int = 1024) -> list[dict]:
    """The Kronecker MLP configuration and the low-rank and shared-basis ranks of at most
    its size, with their model sizes (tied embedding once)."""
    a_shape = (int(a_shape[0]), int(a_shape[1]))
    m = match_mlp_ranks(a_shape, k, scalars, sparse, group, n_embd, n_layer)
    base = lambda wpe: gpt_param_count(n_embd, n_layer, vocab, block_size, mlp_matrix_params=0, include_wpe=wpe)
    kron_name = f"kron A{a_shape} k={k}" + (" +scalars" if scalars else "") + (f" +sparse p={sparse:g}" if sparse else "")
    rows = [("dense", "", n_layer * 2 * 4 * n_embd * n_embd),
            (kron_name, "", m.budget),
            ("lowrank", f"lowrank_rank={m.lowrank_rank}", m.lowrank_rank * m.lowrank_cost),
            ("shared", f"lowrank_rank={m.shared_rank}, share_group={group}", m.shared_rank * m.shared_cost)]
    return [dict(method=name, setting=setting, mlp_weights=n, model_size=base(True) + n,
                 model_size_no_wpe=base(False) + n) for name, setting, n in rows]


def format_rows(rows: list[dict]) -> str:
    """A markdown table of dicts with the same keys (numbers with thousands separators)."""
    keys = list(rows[0])
    cell = lambda v: f"{v:,}" if isinstance(v, int) else (f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def size_report(config) -> str:
    """Parameter counts of the model `config` describes (built on the meta device, no memory):
    which method each linear layer uses, and the totals in the three conventions."""
    from model import GPT, LINEAR_NAMES      # lazy: model.py imports this module
    with torch.device("meta"):
        model = GPT(config)
    per_method: dict[str, list[str]] = {}
    for layer, block in enumerate(model.transformer.h):
        for name in LINEAR_NAMES:
            kind = type(block.get_submodule(name)).__name__
            per_method.setdefault(kind, []).append(f"h.{layer}.{name}")
    total, no_wpe = model.num_params(), model.num_params(include_wpe=False)
    untied = config.vocab_size * config.n_embd
    lines = [f"{kind}: {len(names)} layers ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
             for kind, names in per_method.items()]
    lines += [f"parameters (tied embedding counted once, with position embeddings): {total:,}",
              f"parameters without position embeddings (the paper's '92.2M' convention): {no_wpe:,}",
              f"with an untied output matrix the model would hold {total + untied:,}; KnGPT-2 / TQCompressedGPT2 "
              f"report such models without that matrix, i.e. {total:,} (their '119M*' convention)"]
    sparse_bytes = sum(m.index_bytes() for m in model.modules() if hasattr(m, "index_bytes"))
    if sparse_bytes:
        lines.append(f"sparse residual indices (buffers, not parameters): {sparse_bytes:,} bytes")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lowrank.py", description="Low-rank and shared-basis sizes next to Kronecker ones.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("plan-rank", help="the low-rank / shared-basis rank matching a Kronecker MLP size",
                        description="For a Kronecker configuration of every MLP (A shape for c_fc; c_proj "
                        "uses it transposed), print the largest low-rank rank and shared-basis size whose "
                        "MLP weights do not exceed the Kronecker ones, with model sizes.")
    pr.add_argument("--kron-shape", type=int, nargs=2, required=True, metavar=("M1", "N1"))
    pr.add_argument("--factors", type=int, default=1)
    pr.add_argument("--scalars", action="store_true")
    pr.add_argument("--sparse", type=float, default=0.0, help="kron_sparse fraction p (its values count)")
    pr.add_argument("--group", type=int, default=2, help="layers sharing one basis (share_group)")
    pc = sub.add_parser("count", help="parameter counts of a setup (compress_targets)",
                        description="Builds the model on the meta device and prints which layers each "
                        "method replaces and the parameter counts (with / without wpe, untied-output convention).")
    pc.add_argument("--targets", default="[]", help="compress_targets as JSON (a list of dicts)")
    pc.add_argument("--mlp", default="dense", help="method of the MLPs no target selects")
    pc.add_argument("--kron-shape", type=int, nargs=2, metavar=("M1", "N1"))
    pc.add_argument("--factors", type=int, default=1)
    pc.add_argument("--sparse", type=float, default=0.0)
    pc.add_argument("--rank", type=int, default=None, help="lowrank_rank")
    pc.add_argument("--group", type=int, default=2)
    for q in (pr, pc):
        q.add_argument("--n-embd", type=int, default=768)
        q.add_argument("--n-layer", type=int, default=12)
        q.add_argument("--n-head", type=int, default=12)
        q.add_argument("--vocab", type=int, default=50257)
        q.add_argument("--block-size", type=int, default=1024)
    args = p.parse_args(argv)
    try:
        if args.cmd == "plan-rank":
            rows = plan_rank(tuple(args.kron_shape), args.factors, args.scalars, args.sparse, args.group,
                             args.n_embd, args.n_layer, args.vocab, args.block_size)
            print(format_rows(rows))
        else:
            from model import GPTConfig
            config = GPTConfig(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                               vocab_size=args.vocab, block_size=args.block_size, mlp=args.mlp,
                               kron_shape=args.kron_shape, kron_factors=args.factors, kron_sparse=args.sparse,
                               lowrank_rank=args.rank, share_group=args.group, compress_targets=args.targets)
            print(size_report(config))
    except ValueError as e:          # bad shapes, ranks or targets: say what to change, no traceback
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
