"""
Parameter counts and size planning, for every compression method:

- gpt_param_count: a GPT-2's parameters from its sizes, with any MLP matrix size,
- the Kronecker planner: every (A, B) shape for the MLP matrices with its model size,
- the equal-size ranks: the low-rank rank and shared-basis size whose parameters
  do not exceed a Kronecker configuration's,
- size_report: what a GPTConfig and a compression spec build (on the meta device), layer by layer.

sizes.py is their command line. Sizes count the tied embedding once; "without wpe" leaves out the position embeddings
(the paper's '92.2M' convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress import Compression, build
from kronecker import b_shape_for, divisors, rank_bound, sparse_count
from model import GPTConfig, LINEAR_NAMES


# -----------------------------------------------------------------------------
# A GPT-2's parameters

def gpt_param_count(n_embd: int = 768, n_layer: int = 12, vocab: int = 50257, block_size: int = 1024,
                    mlp_matrix_params: int | None = None, include_wpe: bool = True) -> int:
    """Parameters of a GPT-2 with tied embeddings, biases and LayerNorms.

    mlp_matrix_params: parameters of ONE MLP weight matrix (c_fc or c_proj, the
    two are the same size); None means dense (4 * n_embd * n_embd)."""
    d = n_embd
    if mlp_matrix_params is None:
        mlp_matrix_params = 4 * d * d
    per_layer = (2 * d                        # ln_1
                 + 3 * d * d + 3 * d          # attn.c_attn
                 + d * d + d                  # attn.c_proj
                 + 2 * d                      # ln_2
                 + 2 * mlp_matrix_params      # mlp.c_fc, mlp.c_proj weights
                 + 4 * d + d)                 # their biases
    total = vocab * d + n_layer * per_layer + 2 * d  # wte (tied with lm_head), ln_f
    return total + (block_size * d if include_wpe else 0)


def kron_matrix_params(shape: tuple[int, int], a_shape: tuple[int, int], k: int = 1,
                       scalars: bool = False, sparse: float = 0.0) -> int:
    """Trainable parameters of one KronLinear weight (out, in): k (m1 n1 + m2 n2) [+ k scalars]
    [+ the sparse residual's values]."""
    m2, n2 = b_shape_for(shape, a_shape, k)
    return k * (a_shape[0] * a_shape[1] + m2 * n2 + (1 if scalars else 0)) + sparse_count(shape, sparse)


# -----------------------------------------------------------------------------
# The Kronecker planner

@dataclass
class PlanRow:
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    matrix_params: int        # one MLP matrix: k * (m1*n1 + m2*n2) [+ k scalars]
    rank_bound: int           # min(m1*n1, m2*n2): most useful factors
    kron_rank: int            # min(m1,n1)*min(m2,n2): rank of one A (x) B
    model_size: int           # with position embeddings
    model_size_no_wpe: int


def plan(n_embd: int = 768, n_layer: int = 12, vocab: int = 50257, block_size: int = 1024,
         factors: int = 1, scalars: bool = False, max_rank_only: bool = False) -> list[PlanRow]:
    """Every (A, B) shape for c_fc (4*n_embd, n_embd), with its size; sorted by size."""
    out_f, in_f = 4 * n_embd, n_embd
    rows = []
    for m1 in divisors(out_f):
        for n1 in divisors(in_f):
            a, b = (m1, n1), (out_f // m1, in_f // n1)
            if factors > rank_bound(a, b):
                continue
            kr = min(a) * min(b)
            if max_rank_only and kr != n_embd:
                continue
            mp = kron_matrix_params((out_f, in_f), a, factors, scalars)
            rows.append(PlanRow(a, b, mp, rank_bound(a, b), kr,
                                gpt_param_count(n_embd, n_layer, vocab, block_size, mp, True),
                                gpt_param_count(n_embd, n_layer, vocab, block_size, mp, False)))
    rows.sort(key=lambda r: (r.matrix_params, r.a_shape))
    return rows


def format_plan(rows: list[PlanRow]) -> str:
    head = f"| {'A shape (c_fc)':<16} | {'B shape':<10} | {'params/matrix':>13} | {'rank bound':>10} | " \
           f"{'rank A(x)B':>10} | {'model size':>13} | {'without wpe':>13} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {str(r.a_shape):<16} | {str(r.b_shape):<10} | {r.matrix_params:>13,} | "
                     f"{r.rank_bound:>10,} | {r.kron_rank:>10,} | {r.model_size:>13,} | {r.model_size_no_wpe:>13,} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Low-rank and shared-basis sizes at equal parameter count

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


# -----------------------------------------------------------------------------
# What a config builds

def size_report(config: GPTConfig, spec: Compression) -> str:
    """Parameter counts of the model `config` and `spec` describe (built on the meta device, no
    memory): which method each linear layer uses, and the totals in the three conventions."""
    with torch.device("meta"):
        model = build(config, spec)
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
