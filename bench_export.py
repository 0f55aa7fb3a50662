"""
What the compact export (export_hf.py --compact) costs and saves in transformers: file size, peak
memory and greedy decoding speed of Krony-81M (GPT-2 small with c_fc A (1536, 384), B (2, 2)) as
factors, against its dense export and a dense GPT-2. The weights are random (the real shapes are
what matters for size and speed):

    python bench_export.py --work /tmp/krony_bench --new_tokens 64 --rounds 5 --threads 1

It writes two checkpoints and three exports under --work (through export_hf.py, as a user would;
they are reused by later runs: delete --work after changing export_hf.py or modeling_krony.py),
measures each model's peak memory in a process of its own (load + generate), then times decoding of
the three in one process, interleaved round by round, so that a busy machine slows them alike; the
ratios are the result to read. Needs transformers, safetensors and ~2 GB of disk under --work.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from checkpoints import save_checkpoint
from compress import build
from model import GPTConfig
from runtime import ArgumentParser, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {  # name -> (run, export options)
    "Krony-81M compact": ("krony81", ["--compact"]),
    "Krony-81M dense export": ("krony81", []),
    "GPT-2 124M": ("gpt2", []),
}
CONFIGS = {"krony81": dict(mlp="kron", kron_shape=(1536, 384)), "gpt2": {}}


def prepare(work: str) -> dict[str, str]:
    """The checkpoints and the exports (reused when they are there); returns name -> export directory."""
    dirs = {}
    for run, overrides in CONFIGS.items():
        ckpt = os.path.join(work, "runs", run, "ckpt_best.pt")
        if not os.path.isfile(ckpt):
            torch.manual_seed(0)
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            save_checkpoint(build(GPTConfig(), **overrides), ckpt)
    for name, (run, options) in MODELS.items():
        out = os.path.join(work, "hf", name.split()[0].lower() + ("-compact" if options else "-dense"))
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            subprocess.run([sys.executable, os.path.join(ROOT, "export_hf.py"), "--model",
                            os.path.join(work, "runs", run), "--out", out, "--overwrite", *options], check=True)
        dirs[name] = out
    return dirs


def load(directory: str):
    from transformers import AutoModelForCausalLM
    compact = os.path.isfile(os.path.join(directory, "modeling_krony.py"))
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=compact).eval()


def decode(model, new_tokens: int) -> float:
    """Seconds for greedy decoding of new_tokens tokens after a 16-token prompt, batch 1."""
    prompt = torch.arange(1000, 1016)[None]
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def worker(directory: str | None, new_tokens: int) -> None:
    """One process: load the model (none: the interpreter with torch and transformers only),
    decode, print the peak resident memory."""
    import transformers  # noqa: F401 -- its import is part of every process's baseline
    del transformers
    if directory is not None:
        decode(load(directory), new_tokens)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(directory: str | None, new_tokens: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", directory or "", "--new_tokens", str(new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip().rstrip(":") + ".")
    p.add_argument("--work", default="/tmp/krony_bench", help="directory for the checkpoints and exports")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per timed decode (batch 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared host, more threads wait for each other's cores)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes (decoding speed only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        return worker(args.worker or None, args.new_tokens)

    load_before = os.getloadavg()
    dirs = prepare(args.work)
    sizes = {n: os.path.getsize(os.path.join(d, "model.safetensors")) / 2**20 for n, d in dirs.items()}
    baseline = 0.0 if args.no_memory else peak_memory(None, args.new_tokens)
    memory = {n: 0.0 for n in dirs}
    for n, d in dirs.items():
        if not args.no_memory:
            memory[n] = peak_memory(d, args.new_tokens)
            print(f"{n}: peak RSS {memory[n]:.0f} MiB", file=sys.stderr, flush=True)
    models = {n: load(d) for n, d in dirs.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for n, m in models.items():         # warm-up
        decode(m, 4)
    names = list(models)
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:      # rotate who goes first
            times[n].append(decode(models[n], args.new_tokens))
            print(f"round {r}: {n} {args.new_tokens / times[n][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    ref = "GPT-2 124M"
    tps = {n: args.new_tokens / statistics.median(t) for n, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, {args.new_tokens} new tokens after 16, "
          f"median of {args.rounds} interleaved rounds; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; interpreter + torch + transformers alone: {baseline:.0f} MiB")
    print("| model | model.safetensors (MiB) | peak RSS (MiB) | RSS above the interpreter (MiB) | "
          "decode tokens/s | speed vs GPT-2 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in models:
        print(f"| {n} | {sizes[n]:.0f} | {memory[n]:.0f} | {memory[n] - baseline:.0f} | {tps[n]:.1f} | "
              f"{tps[n] / tps[ref]:.2f}x |")


if __name__ == "__main__":
    run_cli(main)
