"""
Parameter counts and size planning from the command line (planning.py does the counting):

    python sizes.py plan --kron_factors 4 --max_rank_only          # Table 1 of the Krony-PT paper
    python sizes.py plan-rank --kron_shape 1536 384                # ranks matching a Kronecker size
    python sizes.py count --compress_targets '[...]'               # sizes of a compress_targets setup

also reached as `python kronecker.py plan` and `python lowrank.py plan-rank|count`. Options are
spelled as the config keys they mean (kron_factors, kron_shape, lowrank_rank, share_group, ...).
"""
from __future__ import annotations

from compress import resolve
from model import GPTConfig
from planning import format_plan, format_rows, gpt_param_count, plan, plan_rank, size_report
from runtime import ArgumentParser, run_cli


# -----------------------------------------------------------------------------
# The command line

# flags that are sizes or counts: checked before any work, as a zero or negative one
# would print an empty table or fail deep inside the model
POSITIVE_FLAGS = ("n_embd", "n_layer", "n_head", "vocab_size", "block_size", "kron_factors", "share_group",
                  "lowrank_rank")


def add_model_sizes(q: ArgumentParser, n_head: bool) -> None:
    q.add_argument("--n_embd", type=int, default=768, help="width of the residual stream")
    q.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    if n_head:
        q.add_argument("--n_head", type=int, default=12, help="attention heads")
    q.add_argument("--vocab_size", type=int, default=50257, help="tokens of the vocabulary")
    q.add_renamed("--vocab", "vocab_size", type=int)
    q.add_argument("--block_size", type=int, default=1024, help="context length (position embeddings)")


def add_kron_options(q: ArgumentParser, sparse: bool) -> None:
    q.add_argument("--kron_factors", type=int, default=1, help="number k of Kronecker factors per matrix")
    q.add_renamed("--factors", "kron_factors", type=int)
    q.add_argument("--kron_scalars", action="store_true", help="count one trained scalar per factor")
    q.add_renamed("--scalars", "kron_scalars", action="store_true")
    if sparse:
        q.add_argument("--kron_sparse", type=float, default=0.0, help="kron_sparse fraction p (its values count)")
        q.add_renamed("--sparse", "kron_sparse", type=float)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sizes.py", description="Parameter counts and size planning for every compression "
                       "method. Options are spelled as the config keys they mean.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="table of valid A/B shapes for the MLP matrices, with model sizes",
                        description="Lists every A shape (m1, n1) that tiles c_fc (4*n_embd, n_embd); "
                        "c_proj uses the transposed shapes. Sizes count the tied embedding once; "
                        "'model size' includes the position embeddings, 'without wpe' leaves them out "
                        "(the paper's '92.2M' convention). A row is chosen in train.py by either of its "
                        "shapes: kron_shape=(m1, n1) (A) or kron_b_shape=(m2, n2) (B, which means the same "
                        "at any width). How the factors start: kron_init, prune_b_second, kron_permute, "
                        "calib_tokens (python train.py --help).")
    add_model_sizes(pp, n_head=False)
    add_kron_options(pp, sparse=False)
    pp.add_argument("--max_rank_only", action="store_true",
                    help="only shapes with min(m1,n1)*min(m2,n2) = n_embd (the paper's Table 1)")
    pr = sub.add_parser("plan-rank", help="the low-rank / shared-basis rank matching a Kronecker MLP size",
                        description="For a Kronecker configuration of every MLP (A shape for c_fc; c_proj "
                        "uses it transposed), print the largest low-rank rank and shared-basis size whose "
                        "MLP weights do not exceed the Kronecker ones, with model sizes.")
    pr.add_argument("--kron_shape", type=int, nargs=2, metavar=("M1", "N1"), help="A shape for c_fc (required)")
    add_kron_options(pr, sparse=True)
    pr.add_argument("--share_group", type=int, default=2, help="layers sharing one basis")
    pr.add_renamed("--group", "share_group", type=int)
    add_model_sizes(pr, n_head=True)
    pc = sub.add_parser("count", help="parameter counts of a setup (compress_targets)",
                        description="Builds the model on the meta device and prints which layers each "
                        "method replaces and the parameter counts (with / without wpe, untied-output convention).")
    pc.add_argument("--compress_targets", default="[]", help="compress_targets as JSON (a list of dicts)")
    pc.add_renamed("--targets", "compress_targets")
    pc.add_argument("--mlp", default="dense", help="method of the MLPs no target selects")
    pc.add_argument("--kron_shape", type=int, nargs=2, metavar=("M1", "N1"), help="A shape for c_fc")
    add_kron_options(pc, sparse=True)
    pc.add_argument("--lowrank_rank", type=int, default=None, help="rank of lowrank, basis size of shared")
    pc.add_renamed("--rank", "lowrank_rank", type=int)
    pc.add_argument("--share_group", type=int, default=2, help="layers sharing one basis")
    pc.add_renamed("--group", "share_group", type=int)
    add_model_sizes(pc, n_head=True)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run one command with argv, e.g. ["plan", "--kron_factors", "4"]."""
    args = build_parser().parse_args(argv)
    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.cmd == "plan":
        rows = plan(args.n_embd, args.n_layer, args.vocab_size, args.block_size, args.kron_factors,
                    args.kron_scalars, args.max_rank_only)
        dense = gpt_param_count(args.n_embd, args.n_layer, args.vocab_size, args.block_size)
        print(f"dense GPT-2 (n_embd={args.n_embd}, n_layer={args.n_layer}): {dense:,} parameters "
              f"({gpt_param_count(args.n_embd, args.n_layer, args.vocab_size, args.block_size, include_wpe=False):,}"
              f" without wpe); k={args.kron_factors} factor(s){' with scalars' if args.kron_scalars else ''}")
        print(format_plan(rows))
    elif args.cmd == "plan-rank":
        if args.kron_shape is None:
            raise ValueError("plan-rank needs --kron_shape M1 N1, the A shape of c_fc")
        rows = plan_rank(tuple(args.kron_shape), args.kron_factors, args.kron_scalars, args.kron_sparse,
                         args.share_group, args.n_embd, args.n_layer, args.vocab_size, args.block_size)
        print(format_rows(rows))
    else:
        config = GPTConfig(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                           vocab_size=args.vocab_size, block_size=args.block_size)
        spec = resolve(config, mlp=args.mlp, kron_shape=args.kron_shape, kron_factors=args.kron_factors,
                       kron_scalars=args.kron_scalars, kron_sparse=args.kron_sparse, lowrank_rank=args.lowrank_rank,
                       share_group=args.share_group, compress_targets=args.compress_targets)
        print(size_report(config, spec))


if __name__ == "__main__":
    run_cli(main)
