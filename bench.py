"""
Speed and memory benchmarks: Kronecker layers and models against dense GPT-2.

    python bench.py                                        # CPU float32, a few minutes on 2 cores
    python bench.py --sections layer --tokens 4096
    python bench.py --device cuda --dtype bfloat16 --compile   # on a GPU

Sections (--sections, comma-separated):
  layer     forward+backward of KronLinear vs dense nn.Linear vs materialise-then-matmul,
            for every Table 1 shape at GPT-2 sizes (c_fc 768->3072, c_proj 3072->768),
            beside the arithmetic limit (dense multiply-adds / factored multiply-adds); each pair
            runs in the hidden order compress.py gives it (kronecker.swap_hidden_order), and a
            swapped layer is also timed in the standard order; on CPU float32, for small layers,
            the GEMM ceiling (the speed-up if only its matrix products cost time, in cache)
  model     training-step tokens/s and peak memory, GPT-2 124M dense vs Krony-81M/-96M/-92M/-67M,
            same code and batch (random init, no download); one subprocess per model
  generate  tokens/s with the KV cache, dense vs Kronecker, and per-token time at two context lengths
  data      prepare_owt.py tokenisation throughput on ../shared/data/tinyshakespeare.txt repeated
  distill   peak memory of train.py's training step with and without knowledge distillation (a dense
            GPT-2 teacher, Krony-81M student), each a fresh `python train.py` process on random tokens

Every speed-up is a ratio of two timings taken in the same run: warm-up first, then the median of
--repeats timings, the candidates interleaved in shuffled order so that machine noise hits all alike.
Prints one markdown table per section and writes everything to --out (JSON).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
from checkpoints import save_checkpoint
from compress import build
from kron_kernels import factored_macs
from kronecker import KronLinear, frozen_kron_weights, swap_hidden_order
from model import GPT, GPTConfig, KVCache
from runtime import ArgumentParser, run_cli, sync

REPO = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("layer", "model", "generate", "data", "distill")
# Table 1 of the paper: (A shape for c_fc (3072, 768), k); c_proj uses the transposed shapes.
TABLE1 = [((64, 32), 1), ((128, 32), 1), ((1024, 256), 1), ((768, 768), 1), ((1536, 384), 1),
          ((1536, 768), 1), ((3072, 768), 1), ((1024, 256), 4)]
# Models of the model/generate sections: name -> (B shape for c_fc, k) or None for dense. The A
# shape follows from n_embd, so the same B classes also give the scaled-down --quick models.
MODELS = {"gpt2-124M": None, "krony-81M": ((2, 2), 1), "krony-96M": ((2, 1), 1), "krony-92M-4f": ((3, 3), 4),
          "krony-67M": ((48, 24), 1)}


# -----------------------------------------------------------------------------
# Timing

def race(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved in a fresh random order every round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(repeats):
        random.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def autocast(device: str, dtype: str):
    """bf16 autocast (parameters stay float32, as in training), or nothing for float32."""
    return runtime.autocast(device, runtime.DTYPES[dtype])


def maybe_compile(module: nn.Module, compile: bool) -> nn.Module:
    return torch.compile(module) if compile else module


# -----------------------------------------------------------------------------
# Layer section

# The matrix products of a layer's forward and backward, as the CPU profiler names them.
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mv", "aten::addmv_")
CEILING_ROWS = 64       # few enough rows that every tensor of the layer's step stays in cache
# ... which needs small parameters too (the 67M class: 13-18 KB): a big factor, re-read from memory
# for every 64 rows, would make the in-cache GEMMs slower than the real ones, not a ceiling.
CEILING_MAX_PARAM_BYTES = 256 * 1024


class Materialised(nn.Module):
    """Materialise-then-matmul: what the original Krony-PT code does on every forward."""

    def __init__(self, kron: KronLinear):
        super().__init__()
        self.kron = kron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kron.materialize().to(x.dtype), self.kron.bias)


class EinsumKron(nn.Module):
    """The previous factored forward (two einsums over (N, k, ...)), kept as a reference point."""

    def __init__(self, kron: KronLinear, order: str):
        super().__init__()
        self.kron, self.order = kron, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2) = self.kron.a_shape, self.kron.b_shape
        A, B = self.kron.A.to(x.dtype), self.kron.B.to(x.dtype)
        X = x.reshape(-1, n1, n2)                                   # (N, n1, n2)
        if self.order == "a_first":
            Y = torch.einsum("nkmq,krq->nmr", torch.einsum("kmp,npq->nkmq", A, X), B)
        else:
            Y = torch.einsum("kmp,nkpr->nmr", A, torch.einsum("npq,krq->nkpr", X, B))
        return Y.reshape(*x.shape[:-1], m1 * m2) + self.kron.bias.to(Y.dtype)


def train_step_fn(module: nn.Module, x: torch.Tensor, device: str, dtype: str) -> Callable[[], None]:
    """Forward + backward of one layer (gradients set to None first, as zero_grad does)."""
    params = list(module.parameters())
    with autocast(device, dtype):        # as in step(): a compiled module then builds one graph, not two
        out_features = module(x).shape[-1]
    grad = torch.randn(x.shape[0], out_features, device=x.device)

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with autocast(device, dtype):
            y = module(x)
        y.backward(grad.to(y.dtype))
    return step


def gemm_seconds(module: nn.Module, in_features: int, tokens: int, repeats: int) -> float:
    """CPU seconds the matrix products alone of a forward+backward take for `tokens` rows, timed on
    CEILING_ROWS rows that stay in cache and scaled up: no memory traffic, no bias or layout copy,
    no Python. dense time / this = the speed-up the layer would reach if everything but its
    GEMMs were free: the ceiling of its path's sequence of BLAS calls on this machine."""
    x = torch.randn(CEILING_ROWS, in_features, requires_grad=True)
    step = train_step_fn(module, x, "cpu", "float32")
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    micros = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
    return micros / 1e6 / repeats * tokens / CEILING_ROWS


def bench_layers(args) -> list[dict]:
    d = 768
    rows = []
    shapes = TABLE1[:3] if args.quick else TABLE1
    for a_fc, k in shapes:
        if args.compile:                # fresh compile caches for each shape: the layers of earlier
            torch._dynamo.reset()       # shapes would otherwise use up dynamo's recompile limit
        torch.manual_seed(0)
        pair = {"c_fc": KronLinear(d, 4 * d, a_fc, k).to(args.device),
                "c_proj": KronLinear(4 * d, d, a_fc[::-1], k).to(args.device)}
        swapped = swap_hidden_order(pair["c_fc"], pair["c_proj"])     # as compress.py sets them up
        for matrix, kron in pair.items():
            in_f, out_f = kron.in_features, kron.out_features
            torch.manual_seed(0)
            dense = nn.Linear(in_f, out_f).to(args.device)
            x = torch.randn(args.tokens, in_f, device=args.device, requires_grad=True)
            macs, order = factored_macs(kron.a_shape, kron.b_shape, k)
            variants = {"dense": dense, "kron": kron, "materialised": Materialised(kron),
                        "einsum": EinsumKron(kron, order)}
            if swapped:                         # the same layer in nn.Linear's feature order
                variants["standard"] = copy.deepcopy(kron)
                variants["standard"].swap_in = variants["standard"].swap_out = False
            fns = {name: train_step_fn(maybe_compile(m, args.compile), x, args.device, args.dtype)
                   for name, m in variants.items()}
            t = race(fns, args.repeats, args.warmup, args.device)
            limit = in_f * out_f / macs
            speedup = t["dense"] / t["kron"]
            # on the CPU in eager mode (the profiler's CPU times are the GEMMs' own there), small layers
            param_bytes = sum(p.numel() * p.element_size() for p in kron.parameters())
            ceiling = (t["dense"] / gemm_seconds(kron, in_f, args.tokens, 4 * args.repeats)
                       if args.device == "cpu" and not args.compile and args.dtype == "float32"
                       and param_bytes <= CEILING_MAX_PARAM_BYTES else None)
            rows.append(dict(matrix=matrix, a_shape=list(kron.a_shape), b_shape=list(kron.b_shape), k=k,
                             path=kron.path, hidden_order="swapped" if swapped else "standard",
                             tokens=args.tokens, limit=limit,
                             dense_ms=1e3 * t["dense"], kron_ms=1e3 * t["kron"],
                             materialised_ms=1e3 * t["materialised"], einsum_ms=1e3 * t["einsum"],
                             speedup=speedup, fraction_of_limit=speedup / limit,
                             gemm_ceiling=ceiling, gemm_ceiling_of_limit=None if ceiling is None else ceiling / limit,
                             vs_materialised=t["materialised"] / t["kron"],
                             einsum_speedup=t["dense"] / t["einsum"],
                             standard_order_speedup=t["dense"] / t["standard"] if swapped else None,
                             # forward + backward is 3x the forward multiply-adds, 2 FLOPs each:
                             # % of limit = kron GFLOP/s / dense GFLOP/s (kernel efficiency)
                             dense_gflops=6 * in_f * out_f * args.tokens / t["dense"] / 1e9,
                             kron_gflops=6 * macs * args.tokens / t["kron"] / 1e9))
            print(f"  {matrix} A{kron.a_shape} B{kron.b_shape} k={k}: {speedup:.2f}x (limit {limit:.2f})",
                  file=sys.stderr, flush=True)
    return rows


def layer_table(rows: list[dict]) -> str:
    lines = ["| matrix | A | B | k | path | hidden order | limit | dense ms | kron ms | speed-up | % of limit "
             "| GEMM ceiling (% of limit) | standard-order speed-up | vs materialised | einsum speed-up "
             "| dense GFLOP/s | kron GFLOP/s |",
             "|" + "---|" * 17]
    for r in rows:
        std = "—" if r["standard_order_speedup"] is None else f"{r['standard_order_speedup']:.2f}x"
        ceiling = ("—" if r["gemm_ceiling"] is None
                   else f"{r['gemm_ceiling']:.2f}x ({100 * r['gemm_ceiling_of_limit']:.0f}%)")
        lines.append(f"| {r['matrix']} | {tuple(r['a_shape'])} | {tuple(r['b_shape'])} | {r['k']} | {r['path']} "
                     f"| {r['hidden_order']} "
                     f"| {r['limit']:.2f} | {r['dense_ms']:.1f} | {r['kron_ms']:.1f} | {r['speedup']:.2f}x "
                     f"| {100 * r['fraction_of_limit']:.0f}% | {ceiling} | {std} | {r['vs_materialised']:.2f}x "
                     f"| {r['einsum_speedup']:.2f}x | {r['dense_gflops']:.0f} | {r['kron_gflops']:.0f} |")
    return "\n".join(lines)


def layer_targets(rows: list[dict]) -> dict:
    """The layer targets: >= 70% of the arithmetic limit where the limit is ~2 or more ((1536, 384) (x)
    (2, 2), limit 1.99, counts among them); never slower than materialise-then-matmul (within 5% timing
    noise: on the materialised path the two are the same computation)."""
    big = [r for r in rows if round(r["limit"], 1) >= 2]
    return {"rows_with_limit_ge_2": len(big),
            "met_70pct_of_limit": sum(r["fraction_of_limit"] >= 0.7 for r in big),
            "not_slower_than_materialised": sum(r["vs_materialised"] >= 0.95 for r in rows),
            "rows": len(rows)}


# -----------------------------------------------------------------------------
# Model section

def model_config(name: str, quick: bool) -> tuple[GPTConfig, dict]:
    """GPT-2 small (or a tiny GPT for --quick) and the compression keys of `name`'s MLPs (see MODELS)."""
    config = GPTConfig(**(dict(n_layer=2, n_head=2, n_embd=96, block_size=64) if quick else {}))
    spec = MODELS[name]
    if spec is None:
        return config, {}
    (m2, n2), k = spec
    d = config.n_embd
    return config, dict(mlp="kron", kron_shape=(4 * d // m2, d // n2), kron_factors=k)


def macs_per_token(name: str, quick: bool, seq: int) -> int:
    """Forward multiply-adds per token (GPT.macs_per_token), from a weightless model."""
    with torch.device("meta"):
        config, keys = model_config(name, quick)
        return build(config, **keys).macs_per_token(seq)


def build_train_step(name: str, args) -> tuple[GPT, Callable[[], None]]:
    """A model of MODELS and one closure running forward + backward + AdamW on a fixed random batch."""
    torch.manual_seed(0)
    config, keys = model_config(name, args.quick)
    model = build(config, **keys).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    cmodel = maybe_compile(model, args.compile)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)

    def step() -> None:
        with autocast(args.device, args.dtype):
            _, loss = cmodel(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def model_worker(args) -> None:
    """Peak memory of one model's training step, in its own process. Prints one JSON line."""
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, step = build_train_step(args.worker_model, args)
    for _ in range(2):                            # the second step has the AdamW state allocated
        step()
    sync(args.device)
    out = dict(model=args.worker_model, params=model.num_params(),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base_rss_mb=base_rss / 1024)
    if args.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("WORKER_JSON " + json.dumps(out))


def run_worker(args, name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker_model", name, "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
           "--repeats", "1", "--warmup", "0"]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--compile"] if args.compile else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("WORKER_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("WORKER_JSON "):])


def bench_models(args) -> dict:
    # Memory: one fresh process per model. Speed: all models in this process, their steps
    # interleaved (machine noise on a shared host would otherwise decide the ratios).
    rows = []
    for name in MODELS:
        print(f"  peak memory of {name} ...", file=sys.stderr, flush=True)
        rows.append(run_worker(args, name))
    print("  interleaved training steps ...", file=sys.stderr, flush=True)
    steps = {name: build_train_step(name, args)[1] for name in MODELS}
    t = race(steps, args.model_repeats, 1, args.device)
    del steps
    dense_macs = macs_per_token("gpt2-124M", args.quick, args.seq)
    key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    for r in rows:
        r["step_s"] = t[r["model"]]
        r["tokens_per_s"] = args.batch * args.seq / r["step_s"]
        r["arith_limit"] = dense_macs / macs_per_token(r["model"], args.quick, args.seq)
        r["speedup"] = t["gpt2-124M"] / r["step_s"]
        r["fraction_of_limit"] = r["speedup"] / r["arith_limit"]
        r["memory_ratio"] = r[key] / rows[0][key]
    return {"batch": args.batch, "seq": args.seq, "rows": rows,
            "memory_measure": ("torch.cuda.max_memory_allocated (params, grads, AdamW state, activations)"
                               if args.device == "cuda" else
                               "peak resident set size (ru_maxrss) of a fresh process per model running two "
                               "training steps, including the ~base_rss_mb of the Python + torch runtime")}


def model_table(res: dict, device: str) -> str:
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    lines = [f"batch {res['batch']} x {res['seq']} tokens; memory: {res['memory_measure']}", "",
             f"| model | params | tokens/s | speed-up | arithmetic limit | % of limit | {mem} | memory vs dense |",
             "|" + "---|" * 8]
    for r in res["rows"]:
        m = r.get("peak_cuda_mb", r["peak_rss_mb"])
        lines.append(f"| {r['model']} | {r['params']:,} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['arith_limit']:.2f} | {100 * r['fraction_of_limit']:.0f}% | {m:.0f} "
                     f"| {r['memory_ratio']:.2f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Generation section

@torch.no_grad()
def bench_generate(args) -> list[dict]:
    """All models' decoding steps are timed in one interleaved race, so host noise hits all alike."""
    contexts = (16, 48) if args.quick else (64, 512)
    names = ("gpt2-124M", "krony-81M", "krony-92M-4f", "krony-67M")
    models, fns = {}, {}
    for name in names:
        torch.manual_seed(0)
        config, keys = model_config(name, args.quick)
        model = models[name] = build(config, **keys).to(args.device).eval()
        for ctx in contexts:
            cache = KVCache(config, 1, args.device, torch.float32)
            with autocast(args.device, args.dtype):
                model(torch.randint(0, config.vocab_size, (1, ctx), device=args.device), cache=cache)
            tok = torch.randint(0, config.vocab_size, (1, 1), device=args.device)

            def decode(model=model, cache=cache, ctx=ctx, tok=tok) -> None:
                cache.pos = ctx                     # always the same context: one new token after ctx
                with autocast(args.device, args.dtype):
                    model(tok, cache=cache)
            fns[name, ctx] = decode
    with contextlib.ExitStack() as frozen:
        for model in models.values():           # as generate() does: a materialised W built once
            frozen.enter_context(frozen_kron_weights(model))
        t = race(fns, args.repeats * 4, args.warmup, args.device)
    rows = []
    for name, model in models.items():
        prompt = torch.randint(0, model.config.vocab_size, (1, contexts[0]), device=args.device)
        n_new = 16 if args.quick else 64
        t0 = time.perf_counter()
        with autocast(args.device, args.dtype):
            model.generate(prompt, n_new, temperature=0)
        sync(args.device)
        gen_tps = n_new / (time.perf_counter() - t0)
        ms = {str(c): 1e3 * t[name, c] for c in contexts}
        rows.append(dict(model=name, ms_per_token=ms, flatness=t[name, contexts[1]] / t[name, contexts[0]],
                         generate_tokens_per_s=gen_tps))
    for r in rows:
        r["speedup"] = rows[0]["ms_per_token"][str(contexts[0])] / r["ms_per_token"][str(contexts[0])]
    return rows


def generate_table(rows: list[dict]) -> str:
    c0, c1 = list(rows[0]["ms_per_token"])
    lines = [f"| model | ms/token @ {c0} ctx | ms/token @ {c1} ctx | ratio {c1}/{c0} | speed-up @ {c0} "
             "| generate() tokens/s |", "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ms_per_token'][c0]:.2f} | {r['ms_per_token'][c1]:.2f} "
                     f"| {r['flatness']:.2f} | {r['speedup']:.2f}x | {r['generate_tokens_per_s']:.1f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Data section

def bench_data(args) -> dict:
    path = args.corpus
    if not os.path.isfile(path):
        raise SystemExit(f"bench.py: corpus {path} not found; pass --corpus PATH to a text file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    repeat = 1 if args.quick else args.corpus_repeat
    docs = [p for p in text.split("\n\n") if p.strip()] * repeat
    if args.quick:
        docs = docs[:2000]
    from corpus import tokenize_batch
    source = "corpus.tokenize_batch (tiktoken GPT-2 BPE, one process)"

    def encode(batch: list[str]) -> int:
        return sum(tokenize_batch({"text": batch}, "text")["len"])
    encode(docs[:100])                             # warm-up: loads the BPE ranks
    t0 = time.perf_counter()
    tokens = sum(encode(docs[i:i + 1024]) for i in range(0, len(docs), 1024))
    dt = time.perf_counter() - t0
    return dict(source=source, corpus=os.path.relpath(path, REPO), repeat=repeat, documents=len(docs),
                tokens=tokens, seconds=dt, tokens_per_s=tokens / dt,
                mb_per_s=sum(len(d) for d in docs) / dt / 1e6)


def data_table(r: dict) -> str:
    return "\n".join([f"tokeniser: {r['source']}", "",
                      "| corpus | documents | tokens | seconds | tokens/s | MB/s |", "|---|---|---|---|---|---|",
                      f"| {r['corpus']} x{r['repeat']} | {r['documents']:,} | {r['tokens']:,} | {r['seconds']:.2f} "
                      f"| {r['tokens_per_s']:,.0f} | {r['mb_per_s']:.2f} |"])


# -----------------------------------------------------------------------------
# Distillation section

def bench_distill(args) -> dict:
    """Peak memory of the same training run (Krony-81M from a dense GPT-2 teacher, 2 steps) with
    distill_alpha 0 (plain cross-entropy), with the chunked KL, and with the KL plus the hidden-state
    MSE: train.py's own run.json records each process's peak (CUDA allocated, or the process RSS)."""
    import tempfile
    import numpy as np
    import data
    size = dict(n_layer=2, n_head=2, n_embd=96, block_size=64) if args.quick else {}
    config = GPTConfig(**size)
    batch, seq = (2, 32) if args.quick else (args.distill_batch, config.block_size)
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".bench-distill-") as tmp:
        rng = np.random.default_rng(0)
        data.write_token_files(os.path.join(tmp, "data"), {s: rng.integers(0, config.vocab_size, n)
                               for s, n in (("train", 4 * batch * seq + 2), ("val", 2 * seq + 2))})
        torch.manual_seed(0)
        teacher = os.path.join(tmp, "teacher.pt")
        save_checkpoint(GPT(config), teacher)
        common = dict(data_dir=os.path.join(tmp, "data"), init_from=teacher, mlp="kron", kron_b_shape=(2, 2),
                      batch_size=batch, block_size=seq, gradient_accumulation_steps=1, max_iters=2, eval_iters=0,
                      always_save_checkpoint=False, device=args.device, dtype=args.dtype, eval_interval=2)
        cases = [("cross-entropy only", {}), ("+ KL (chunked)", dict(distill_from=teacher, distill_alpha=0.5)),
                 ("+ KL + hidden MSE", dict(distill_from=teacher, distill_alpha=0.5, distill_hidden=1.0))]
        for name, extra in cases:
            out = os.path.join(tmp, f"run{len(rows)}")
            keys = {**common, **extra, "out_dir": out}
            print(f"  {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *(f"--{k}={v!r}" for k, v in keys.items())],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"train.py failed for {name}:\n{proc.stderr[-2000:]}")
            with open(os.path.join(out, "run.json")) as f:
                run = json.load(f)
            rows.append(dict(case=name, peak_memory_mb=run["peak_memory_mb"], measure=run["peak_memory_of"],
                             tokens_per_s=run["tokens_per_s"]))
    for r in rows:
        r["memory_ratio"] = r["peak_memory_mb"] / rows[0]["peak_memory_mb"]
    return {"batch": batch, "seq": seq, "rows": rows}


def distill_table(res: dict) -> str:
    lines = [f"Krony-81M student, dense GPT-2 teacher, batch {res['batch']} x {res['seq']} tokens; "
             f"memory: {res['rows'][0]['measure']}", "", "| objective | peak MB | vs cross-entropy | tokens/s |",
             "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['peak_memory_mb']:.0f} | {r['memory_ratio']:.2f}x | {r['tokens_per_s']:.0f} |"
              for r in res["rows"]]
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0].strip(),
                                epilog="Example: python bench.py --sections layer,model --out bench.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every section runs (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16 runs under autocast with float32 parameters, as training does")
    p.add_argument("--compile", action="store_true", help="torch.compile every benchmarked module")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per layer micro-batch (default 2048 on CPU, 24*1024 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="model section: sequences per step (default 1 CPU, 12 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="model section: tokens per sequence (default 256 CPU, 1024 CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per figure (median; default 15: fewer lets host noise through)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt"),
                   help="data section: the text file to tokenise (default ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--corpus_repeat", type=int, default=8, help="data section: how many times to repeat the corpus")
    p.add_argument("--distill_batch", type=int, default=4,
                   help="distill section: sequences per step (of 1024 tokens; default 4, the paper's is 24)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, figures meaningless)")
    p.add_argument("--out", default="bench.json", help="JSON file for all results")
    p.add_argument("--worker_model", default=None, help=argparse.SUPPRESS)  # internal: one model per process
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    args.tokens = args.tokens or (64 if args.quick else 24 * 1024 if cuda else 2048)
    args.batch = args.batch or (1 if args.quick or not cuda else 12)
    args.seq = args.seq or (32 if args.quick else 1024 if cuda else 256)
    args.repeats = args.repeats or (1 if args.quick else 15)
    args.model_repeats = 1 if args.quick else min(args.repeats, 5 if cuda else 8)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.section_list if s not in SECTIONS]
    if bad or not args.section_list:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker_model:
        model_worker(args)
        return {}
    meta = dict(device=args.device, dtype=args.dtype, compile=args.compile, torch=torch.__version__,
                threads=torch.get_num_threads(), repeats=args.repeats, warmup=args.warmup, quick=args.quick,
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    results: dict = {"meta": meta}
    print(f"# bench.py: {args.device} {args.dtype}{' compiled' if args.compile else ''}, torch {torch.__version__}, "
          f"{meta['threads']} threads, median of {args.repeats} after {args.warmup} warm-up\n")
    if "layer" in args.section_list:
        rows = bench_layers(args)
        results["layer"] = {"rows": rows, "targets": layer_targets(rows)}
        print(f"## layer: forward+backward, {args.tokens} tokens (speed-ups vs dense nn.Linear)\n")
        print(layer_table(rows), "\n")
        print(f"targets: {results['layer']['targets']}\n")
    if "model" in args.section_list:
        results["model"] = bench_models(args)
        print("## model: training step (forward + backward + AdamW)\n")
        print(model_table(results["model"], args.device), "\n")
    if "generate" in args.section_list:
        results["generate"] = {"rows": bench_generate(args)}
        print("## generate: one new token with the KV cache, batch 1 (eager)\n")
        print(generate_table(results["generate"]["rows"]), "\n")
    if "distill" in args.section_list:
        results["distill"] = bench_distill(args)
        print("## distill: peak memory of a training step with a teacher\n")
        print(distill_table(results["distill"]), "\n")
    if "data" in args.section_list:
        results["data"] = bench_data(args)
        print("## data: tokenisation throughput\n")
        print(data_table(results["data"]), "\n")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_cli(main)
