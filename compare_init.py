"""
Compare compression methods at equal parameter count, right after initialisation
(no training): for one dense checkpoint and one dataset, the loss of every MLP
compressed with the Kronecker inits (vl, vl-norm, prune, random), vl plus a
sparse residual, low-rank SVD and a shared basis, the last two at the largest
rank that fits the Kronecker size.

    python compare_init.py --model gpt2 --data data/owt/val.bin --kron-shape 1536 384
    python compare_init.py --model ./gpt2 --data ../shared/data/tinyshakespeare.txt \\
        --kron-shape 1536 768 --sparse 0.01 --out init.json --plot init.png

--data is a token file as prepare_owt.py writes (*.bin, uint16 memmap) or a text
file (tokenised with tiktoken's gpt2 BPE). The loss is the mean cross-entropy
over --batches x --batch-size windows of --block-size tokens spread evenly over
the data (the same windows for every method).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import gpt2_encoding, read_meta
from kronecker import b_shape_for
from model import GPT, LINEAR_NAMES, compress
from sizes import format_rows, match_mlp_ranks


def load_tokens(path: str) -> np.ndarray:
    """Token ids from a .bin memmap (prepare_owt.py; its dtype from the meta.json beside it, uint16
    without one) or a text file (tiktoken gpt2)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path}: pass a token .bin (prepare_owt.py) or a text file")
    if path.endswith(".bin"):
        directory = os.path.dirname(os.path.abspath(path))
        has_meta = os.path.isfile(os.path.join(directory, "meta.json"))
        return np.memmap(path, dtype=read_meta(directory)["dtype"] if has_meta else np.uint16, mode="r")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return np.array(gpt2_encoding().encode_ordinary(text), dtype=np.int64)


def eval_windows(tokens: np.ndarray, n_windows: int, block_size: int) -> torch.Tensor:
    """n_windows starts spread evenly over the data; windows of block_size + 1 tokens (inputs + targets)."""
    span = len(tokens) - block_size - 1
    if span < 0:
        raise ValueError(f"the data holds {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use a smaller --block-size or more data")
    starts = np.linspace(0, span, n_windows).astype(np.int64)
    return torch.stack([torch.from_numpy(np.asarray(tokens[s:s + block_size + 1]).astype(np.int64)) for s in starts])


@torch.no_grad()
def mean_loss(model: GPT, windows: torch.Tensor, batch_size: int, device: str) -> float:
    model.eval()
    losses = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        _, loss = model(w[:, :-1].contiguous(), w[:, 1:].contiguous())
        losses.append(loss.item() * len(w))      # every window has block_size targets: weight by rows
    return sum(losses) / len(windows)


def methods(args, dense: GPT) -> list[tuple[str, dict | None, str]]:
    """(name, compress() keyword arguments or None, why n/a) for every row."""
    c = dense.config
    shape, k = tuple(args.kron_shape), args.factors
    kron = dict(mlp="kron", kron_shape=shape, kron_factors=k)
    b_shape = b_shape_for((4 * c.n_embd, c.n_embd), shape, k)            # validates the shape too
    plain = match_mlp_ranks(shape, k, False, 0.0, args.group, c.n_embd, c.n_layer)
    with_sparse = match_mlp_ranks(shape, k, False, args.sparse, args.group, c.n_embd, c.n_layer)
    rows = [(init, dict(kron, kron_init=init), "") for init in ("vl", "vl-norm")]
    if k == 1 and b_shape in ((2, 1), (1, 2)):
        rows.append(("prune", dict(kron, kron_init="prune"), ""))
    else:
        rows.append(("prune", None, f"needs B (2, 1) or (1, 2) and k=1; A {shape} gives B {b_shape}, k={k}"))
    rows.append(("random", dict(kron, kron_init="random"), ""))
    rows.append((f"vl + sparse p={args.sparse:g}", dict(kron, kron_init="vl", kron_sparse=args.sparse), ""))
    rows.append((f"lowrank r={plain.lowrank_rank}", dict(mlp="lowrank", lowrank_rank=plain.lowrank_rank), ""))
    rows.append((f"shared r={plain.shared_rank} g={args.group}",
                 dict(mlp="shared", lowrank_rank=plain.shared_rank, share_group=args.group), ""))
    if args.sparse > 0:     # the sparse row is bigger than the plain Kronecker ones: give it a matched baseline
        rows.append((f"lowrank r={with_sparse.lowrank_rank} (size of vl + sparse)",
                     dict(mlp="lowrank", lowrank_rank=with_sparse.lowrank_rank), ""))
    return rows


def compare(args) -> list[dict]:
    try:
        dense = GPT.load(args.model).to(args.device)
    except RuntimeError as e:            # offline hub, unreadable checkpoint: the message says what to do
        raise ValueError(str(e)) from e
    if any(not isinstance(b.get_submodule(n), nn.Linear) for b in dense.transformer.h for n in LINEAR_NAMES):
        raise ValueError(f"{args.model} is already compressed; compare_init needs a dense checkpoint")
    block_size = min(args.block_size, dense.config.block_size)
    windows = eval_windows(load_tokens(args.data), args.batches * args.batch_size, block_size)
    if int(windows.max()) >= dense.config.vocab_size:
        raise ValueError(f"the data holds token id {int(windows.max())}, beyond the model's vocabulary "
                         f"({dense.config.vocab_size}); was it tokenised with the GPT-2 BPE?")
    records = []
    todo = [("dense (reference)", {}, "")] + methods(args, dense)
    for name, kwargs, why in tqdm(todo, desc="methods", file=sys.stderr):
        rec = dict(method=name, params=None, params_no_wpe=None, loss=None, ppl=None, rel_error=None, note=why)
        if kwargs is not None:
            torch.manual_seed(args.seed)          # the random init is reproducible
            model, report = (dense, []) if not kwargs else compress(dense, svd=args.svd, **kwargs)
            loss = mean_loss(model, windows, args.batch_size, args.device)
            rec.update(params=model.num_params(), params_no_wpe=model.num_params(include_wpe=False),
                       loss=loss, ppl=math.exp(loss),
                       rel_error=sum(r.rel_error for r in report) / len(report) if report else 0.0)
            del model
        records.append(rec)
    return records


def format_table(records: list[dict]) -> str:
    rows = [{"method": r["method"], "params": r["params"] if r["params"] is not None else "n/a",
             "params without wpe": r["params_no_wpe"] if r["params_no_wpe"] is not None else "n/a",
             "mean rel. error": r["rel_error"] if r["rel_error"] is not None else "n/a",
             "loss": r["loss"] if r["loss"] is not None else "n/a",
             "ppl": f"{r['ppl']:.2f}" if r["ppl"] is not None else f"n/a: {r['note']}"} for r in records]
    return format_rows(rows)


def plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib; it is listed in requirements-test.txt, "
                         "not in requirements.txt)")
    done = [r for r in records if r["loss"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(done) + 1.5))
    # points, not bars: the losses differ by far less than their size
    ax.scatter([r["loss"] for r in done], range(len(done)), zorder=3)
    for i, r in enumerate(done):
        ax.annotate(f"{r['params'] / 1e6:.2f}M", (r["loss"], i), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axvline(done[0]["loss"], color="grey", linestyle="--")
    ax.set_title(f"dashed line: {done[0]['method']}; labels: parameters", fontsize=9)
    ax.set_yticks(range(len(done)), [r["method"] for r in done])
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.grid(axis="x", alpha=0.3)
    ax.invert_yaxis()
    ax.set_xlabel("loss right after initialisation (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="compare_init.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="dense model: hub name, Hugging Face directory or our checkpoint")
    p.add_argument("--data", required=True, help="token .bin (uint16, prepare_owt.py) or a text file")
    p.add_argument("--kron-shape", type=int, nargs=2, required=True, metavar=("M1", "N1"),
                   help="A shape for c_fc (c_proj uses it transposed); fixes the parameter budget")
    p.add_argument("--factors", type=int, default=1, help="Kronecker factors k")
    p.add_argument("--sparse", type=float, default=0.01, help="fraction p of the residual kept by 'vl + sparse'")
    p.add_argument("--group", type=int, default=2, help="consecutive layers sharing one basis")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--svd", default="exact", choices=("exact", "randomized"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the records as JSON here")
    p.add_argument("--plot", help="save a bar chart of the losses to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        records = compare(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: offline tokenizer, hub
        p.exit(2, f"error: {e}\n")
    print(format_table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main(sys.argv[1:])
