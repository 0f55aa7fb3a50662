"""
Compare compression methods at equal parameter count, right after initialisation
(no training): for one dense checkpoint and one dataset, the loss of every MLP
compressed with the Kronecker inits (vl, vl-norm, prune, random), vl plus a
sparse residual, low-rank SVD and a shared basis, the last two at the largest
rank that fits the Kronecker size.

    python compare_init.py --model gpt2 --data data/openwebtext/val.bin --kron_shape 1536 384
    python compare_init.py --model ./gpt2 --data ../shared/data/tinyshakespeare.txt \\
        --kron_shape 1536 768 --kron_sparse 0.01 --out init.json --plot init.png
    python compare_init.py --model gpt2 --data data/openwebtext/val.bin --kron_shape 1536 384 \\
        --calib_tokens 65536

--data is a token file as prepare_owt.py writes (*.bin, uint16 memmap) or a text
file (tokenised with tiktoken's gpt2 BPE). With --calib_tokens N, every method that
can be fitted to the teacher's activations gets a second, calibrated row, fitted on
N tokens of --calib_data (default: the train.bin beside a val.bin --data), and the
table adds each row's output error on those inputs. The loss is the mean cross-entropy
over --batches x --batch_size windows of --block_size tokens spread evenly over
the data (the same windows for every method). Options are spelled as the config keys
they mean (kron_shape, kron_factors, kron_sparse, share_group).
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
from checkpoints import load_model
import calibrate
from compress import compress, compression_report
from kronecker import b_shape_for
from model import GPT, LINEAR_NAMES
from runtime import ArgumentParser, run_cli
from planning import format_rows, match_mlp_ranks


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
                         "use a smaller --block_size or more data")
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
    shape, k = tuple(args.kron_shape), args.kron_factors
    kron = dict(mlp="kron", kron_shape=shape, kron_factors=k)
    b_shape = b_shape_for((4 * c.n_embd, c.n_embd), shape, k)            # validates the shape too
    plain = match_mlp_ranks(shape, k, False, 0.0, args.share_group, c.n_embd, c.n_layer)
    with_sparse = match_mlp_ranks(shape, k, False, args.kron_sparse, args.share_group, c.n_embd, c.n_layer)
    rows = [(init, dict(kron, kron_init=init), "") for init in ("vl", "vl-norm")]
    if k == 1 and b_shape in ((2, 1), (1, 2)):
        rows.append(("prune", dict(kron, kron_init="prune"), ""))
    else:
        rows.append(("prune", None, f"needs B (2, 1) or (1, 2) and k=1; A {shape} gives B {b_shape}, k={k}"))
    rows.append(("random", dict(kron, kron_init="random"), ""))
    rows.append((f"vl + sparse p={args.kron_sparse:g}", dict(kron, kron_init="vl", kron_sparse=args.kron_sparse), ""))
    rows.append((f"lowrank r={plain.lowrank_rank}", dict(mlp="lowrank", lowrank_rank=plain.lowrank_rank), ""))
    rows.append((f"shared r={plain.shared_rank} g={args.share_group}",
                 dict(mlp="shared", lowrank_rank=plain.shared_rank, share_group=args.share_group), ""))
    if args.kron_sparse > 0:     # the sparse row is bigger than the plain Kronecker ones: give it a matched baseline
        rows.append((f"lowrank r={with_sparse.lowrank_rank} (size of vl + sparse)",
                     dict(mlp="lowrank", lowrank_rank=with_sparse.lowrank_rank), ""))
    if args.calib_tokens:       # the same setups fitted to the teacher's activations, right below each
        calibrated = [(f"{name}, calibrated", dict(kwargs, calib_tokens=args.calib_tokens), "")
                      for name, kwargs, _ in rows if kwargs and kwargs.get("kron_init", "vl") in ("vl", "vl-norm")
                      and name != "vl"]
        rows = [r for row in rows for r in [row] + [c for c in calibrated if c[0] == f"{row[0]}, calibrated"]]
    return rows


def compare(args) -> list[dict]:
    try:
        dense = load_model(args.model).to(args.device)
    except RuntimeError as e:            # offline hub, unreadable checkpoint: the message says what to do
        raise ValueError(str(e)) from e
    if any(not isinstance(b.get_submodule(n), nn.Linear) for b in dense.transformer.h for n in LINEAR_NAMES):
        raise ValueError(f"{args.model} is already compressed; compare_init needs a dense checkpoint")
    block_size = min(args.block_size, dense.config.block_size)
    windows = eval_windows(load_tokens(args.data), args.batches * args.batch_size, block_size)
    if int(windows.max()) >= dense.config.vocab_size:
        raise ValueError(f"the data holds token id {int(windows.max())}, beyond the model's vocabulary "
                         f"({dense.config.vocab_size}); was it tokenised with the GPT-2 BPE?")
    calib_data, moments = None, None
    if args.calib_tokens:
        calib_data = load_tokens(args.calib_data)
        names = [f"transformer.h.{i}.{n}" for i in range(dense.config.n_layer) for n in ("mlp.c_fc", "mlp.c_proj")]
        batches = calibrate.calibration_windows(calib_data, args.calib_tokens, dense.config.block_size, args.batch_size)
        moments = {n: m.second_moment() for n, m in calibrate.collect_moments(dense, names, batches).items()}
    records = []
    todo = [("dense (reference)", {}, "")] + methods(args, dense)
    for name, kwargs, why in tqdm(todo, desc="methods", file=sys.stderr):
        rec = dict(method=name, params=None, params_no_wpe=None, loss=None, ppl=None, rel_error=None,
                   output_error=None, note=why)
        if kwargs is not None:
            torch.manual_seed(args.seed)          # the random init is reproducible
            model, report = (dense, []) if not kwargs else compress(dense, svd=args.svd, calib_data=calib_data,
                                                                     progress=False, **kwargs)
            loss = mean_loss(model, windows, args.batch_size, args.device)
            rec.update(params=model.num_params(), params_no_wpe=model.num_params(include_wpe=False),
                       loss=loss, ppl=math.exp(loss),
                       rel_error=sum(r.rel_error for r in report) / len(report) if report else 0.0)
            if moments is not None:      # every row's output error on the same calibration inputs
                report = compression_report(dense, model, moments)
                rec["output_error"] = sum(r.output_error for r in report) / len(report) if report else 0.0
            del model
        records.append(rec)
    return records


def format_table(records: list[dict]) -> str:
    rows = [{"method": r["method"], "params": r["params"] if r["params"] is not None else "n/a",
             "params without wpe": r["params_no_wpe"] if r["params_no_wpe"] is not None else "n/a",
             "mean rel. error": r["rel_error"] if r["rel_error"] is not None else "n/a",
             **({"mean output error": r["output_error"] if r["output_error"] is not None else "n/a"}
                if any(x["output_error"] is not None for x in records) else {}),
             "loss": r["loss"] if r["loss"] is not None else "n/a",
             "ppl": f"{r['ppl']:.2f}" if r["ppl"] is not None else f"n/a: {r['note']}"} for r in records]
    return format_rows(rows)


def plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install -r requirements.txt)") from None
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
    p = ArgumentParser(prog="compare_init.py", description=__doc__.split("\n\n")[0].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="dense model: hub name, Hugging Face directory or our checkpoint")
    p.add_argument("--data", required=True, help="token .bin (uint16, prepare_owt.py) or a text file")
    p.add_argument("--kron_shape", type=int, nargs=2, metavar=("M1", "N1"),
                   help="A shape for c_fc (c_proj uses it transposed); fixes the parameter budget (required)")
    p.add_argument("--kron_factors", type=int, default=1, help="Kronecker factors k")
    p.add_renamed("--factors", "kron_factors", type=int)
    p.add_argument("--kron_sparse", type=float, default=0.01, help="fraction p of the residual kept by 'vl + sparse'")
    p.add_renamed("--sparse", "kron_sparse", type=float)
    p.add_argument("--share_group", type=int, default=2, help="consecutive layers sharing one basis")
    p.add_renamed("--group", "share_group", type=int)
    p.add_argument("--batches", type=int, default=8, help="batches of evaluation windows (the same for every method)")
    p.add_argument("--batch_size", type=int, default=4, help="windows per batch")
    p.add_argument("--block_size", type=int, default=1024, help="tokens per window (at most the model's context)")
    p.add_argument("--svd", default="exact", choices=("exact", "randomized"),
                   help="Van Loan's SVD: exact, or randomized (faster for large matrices, approximate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps (default: cuda where there is one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init row")
    p.add_argument("--calib_tokens", type=int, default=0,
                   help="also fit each method to the teacher's activations on this many tokens (0: off)")
    p.add_argument("--calib_data", default=None,
                   help="token .bin or text file to calibrate on (default: the train.bin beside a val.bin --data)")
    p.add_argument("--out", help="write the records as JSON here")
    p.add_argument("--plot", help="save a chart of the losses to this PNG")
    args = p.parse_args(argv)
    if args.kron_shape is None:
        p.error("the following arguments are required: --kron_shape")
    for name in ("kron_factors", "share_group", "batches", "batch_size", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.calib_tokens < 0:
        raise ValueError(f"--calib_tokens must be >= 0 (0: off), got {args.calib_tokens}")
    if args.calib_tokens and args.calib_data is None:
        beside = os.path.join(os.path.dirname(args.data), "train.bin")
        if os.path.basename(args.data) != "val.bin" or not os.path.isfile(beside):
            raise ValueError("--calib_tokens needs --calib_data: calibrate on training data, not on what is scored")
        args.calib_data = beside
    records = compare(args)
    print(format_table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    run_cli(main)
