"""
Perplexity of GPT-2 style models on WikiText-103, WikiText-2 and LAMBADA (and
any local text file), plus LAMBADA last-word accuracy, with one harness for
our checkpoints and for Hugging Face baselines.

    python eval_ppl.py --model gpt2 --model distilgpt2 --model out-krony81m-finetune/ckpt_best.pt \
        --datasets wikitext-103,wikitext-2,lambada --protocol paper --out results.json

Two protocols (docs/evaluation.md has the details):

- paper: the Krony-PT code. The test split's rows are joined with "\\n\\n" and
  tokenised with GPT-2 BPE; the stream is cut into windows of `context`
  (1024) tokens with stride `context`; each window predicts its own tokens
  2..L from the tokens before them in the same window (the first token of a
  window has no context and is not scored); ppl = exp(mean over windows of
  the window's mean loss). The last, shorter window is scored like the others
  and weighs as much as a full window in the mean (as the paper's loop does);
  a last window of a single token has nothing to predict and is dropped.
- sliding: windows of `context` tokens every `stride` (512) tokens; each
  window scores only the tokens that no earlier window scored, so every token
  but the first is scored exactly once with up to context-1 tokens of history;
  ppl = exp(total loss / number of scored tokens).

Precision: --dtype auto evaluates the paper protocol in float32, as the published
numbers were computed (bfloat16 autocast shifts a perplexity enough to blur a
comparison with them), and the sliding protocol with bfloat16 autocast on a CUDA
GPU that has it. Every record names the dtype it was computed in.
"""
from __future__ import annotations

import storage  # first: stdlib only, so that Ctrl-C while torch loads is one line

if __name__ == "__main__":
    storage.exit_quietly_on_ctrl_c()

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
from checkpoints import resolve_model
from data import EVAL_DATASETS, SPLITS, DataError, TokenData, gpt2_encoding
from kronecker import frozen_kron_weights
from runtime import ArgumentParser, DEVICE_HELP, DTYPES, autocast, dtype_name, pick_device, pick_dtype, run_cli
from storage import write_json

DATASETS = EVAL_DATASETS          # name -> (hub dataset, config, split)
PROTOCOLS = ("paper", "sliding")


def is_lambada(dataset: str) -> bool:
    return dataset.startswith("lambada") or dataset.endswith(".jsonl")


# -----------------------------------------------------------------------------
# Data

def load_rows(dataset: str, split: str | None = None) -> list[str]:
    """The rows of a hub dataset's split, as `datasets` stores them."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)} "
                         "or evaluate a local file with --data_file PATH")
    path, config, default_split = DATASETS[dataset]
    split = split or default_split
    from datasets import load_dataset
    try:
        ds = load_dataset(path, config, split=split)
    except Exception as first:  # script-based copies, renamed repos, offline, ...
        print(f"loading {path} ({config}) failed ({type(first).__name__}: {first}); "
              "retrying with revision='refs/convert/parquet'", file=sys.stderr)
        try:
            ds = load_dataset(path, config, split=split, revision="refs/convert/parquet")
        except Exception as second:
            raise RuntimeError(
                f"could not load {dataset!r} ({path}, config {config}, split {split}) from the Hugging Face "
                f"hub, nor its refs/convert/parquet revision ({type(second).__name__}: {second}). Offline? "
                f"Evaluate a local copy instead with --data_file PATH (a text file with one dataset row per "
                f"line, or a .jsonl file with a 'text' field per row).") from second
    return list(ds["text"])


def read_data_file(path: str) -> list[str]:
    """Rows of a local file, in the form the hub's datasets store them.

    .jsonl: the "text" field of each line. Any other file: one row per line,
    as WikiText stores them: a non-blank line keeps its trailing "\\n", a blank
    line is the empty string. So a WikiText split written one row per line
    gives the same joined text, tokens and perplexity as the hub's copy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_file {path}: no such file")
    if path.endswith(".json"):        # e.g. the meta.json of a prepared directory: its text is no data set
        raise ValueError(f"--data_file {path} is a .json file, not a data set: give a text file, a .jsonl file "
                         "with a 'text' field per line, or a token file (the train.bin or val.bin beside a "
                         "meta.json)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--data_file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start:,}); convert it first, e.g. iconv -f latin1 -t utf-8 {path} > converted.txt"
                         ) from None
    if not text.strip():
        raise ValueError(f"--data_file {path} is empty: there is nothing to evaluate")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines = lines[:-1]          # the file's final newline ends the last row, it is no extra row
    lines = [line.rstrip("\r") for line in lines]
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: a .jsonl data file needs one JSON object with a "
                                 f"'text' field per line ({type(e).__name__}: {e})") from e
        return rows
    return [line + "\n" if line.strip() else "" for line in lines]


def read_token_file(path: str) -> list[int]:
    """The tokens of a prepared token file (a train.bin / val.bin of prepare_owt.py), checked
    against the meta.json beside it: evaluated as they are, no tokenizer involved."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_file {path}: no such file")
    directory, name = os.path.split(os.path.abspath(path))
    split = name[:-len(".bin")]
    if split not in SPLITS:
        size = os.path.getsize(path)
        odd = f"; its {size:,} bytes are not even a whole number of uint16 tokens" if size % 2 else ""
        raise ValueError(f"--data_file {path}: a token file is the train.bin or val.bin of a directory "
                         f"prepare_owt.py wrote (checked against the meta.json beside it), not {name}{odd}")
    try:
        tokens = TokenData(directory, log=lambda m: print(m, file=sys.stderr)).splits[split]
    except (DataError, FileNotFoundError) as e:
        raise ValueError(f"--data_file {path}: {e}") from None
    if len(tokens) < 2:
        raise ValueError(f"--data_file {path} holds {len(tokens)} token(s): there is nothing to evaluate")
    return tokens.tolist()


def tokenize_joined(rows: list[str], enc) -> list[int]:
    """The paper's stream: rows joined with a blank line, GPT-2 BPE."""
    return enc.encode_ordinary("\n\n".join(rows))


# -----------------------------------------------------------------------------
# Windows and perplexity

@dataclass
class Window:
    begin: int      # tokens[begin:end] is the window
    end: int
    n_score: int    # score the last n_score of its end-begin-1 predictions


def make_windows(n_tokens: int, context: int, protocol: str, stride: int | None = None) -> list[Window]:
    """The windows of a protocol over a stream of n_tokens tokens."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if context < 2:
        raise ValueError(f"context length must be at least 2 tokens, got {context}")
    if protocol == "paper":
        windows = [Window(b, min(b + context, n_tokens), min(b + context, n_tokens) - b - 1)
                   for b in range(0, n_tokens, context)]
        return [w for w in windows if w.n_score > 0]    # a 1-token tail has nothing to predict
    stride = stride or context // 2
    if not 1 <= stride < context:
        # a window's first token has no context in it, so a stride of `context` would skip tokens
        raise ValueError(f"--stride must be at least 1 and below the context length {context}, got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # new targets are tokens prev_end..end-1; token `begin` itself has no context in this window
        n_score = min(end - prev_end, end - begin - 1)
        if n_score > 0:
            windows.append(Window(begin, end, n_score))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def window_losses(model, tokens: list[int], windows: list[Window], batch_size: int = 8,
                  device: str = "cpu", dtype: torch.dtype = torch.float32,
                  desc: str = "windows") -> list[tuple[float, int]]:
    """(sum of scored token losses, number scored) per window, in order.

    Windows of equal length are batched together; losses are float32."""
    data = torch.tensor(tokens, dtype=torch.long)
    out: list[tuple[float, int] | None] = [None] * len(windows)
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_length.setdefault(w.end - w.begin, []).append(i)
    batches = [ids[j:j + batch_size] for ids in by_length.values() for j in range(0, len(ids), batch_size)]
    with frozen_kron_weights(model):   # a materialised Kronecker W built once, not per batch
        for ids in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 2):
            x = torch.stack([data[windows[i].begin:windows[i].end - 1] for i in ids]).to(device)  # (B, L-1)
            y = torch.stack([data[windows[i].begin + 1:windows[i].end] for i in ids]).to(device)  # (B, L-1)
            with autocast(device, dtype):
                logits, _ = model(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)  # (B, L-1)
            for row, i in enumerate(ids):
                n = windows[i].n_score
                out[i] = (nll[row, -n:].sum().item(), n)
    return out


def perplexity(model, tokens: list[int], protocol: str = "paper", context: int | None = None,
               stride: int | None = None, batch_size: int = 8, device: str = "cpu",
               dtype: torch.dtype = torch.float32, desc: str = "windows") -> dict:
    """Perplexity of `tokens` under a protocol. Returns ppl, scored tokens, windows, context, stride."""
    context = context or model.config.block_size
    if context > model.config.block_size:
        raise ValueError(f"context length {context} is longer than the model's block_size "
                         f"{model.config.block_size}")
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    stride = context if protocol == "paper" else (stride or context // 2)
    windows = make_windows(len(tokens), context, protocol, stride)
    losses = window_losses(model, tokens, windows, batch_size, device, dtype, desc)
    scored = sum(n for _, n in losses)
    if protocol == "paper":
        mean_nll = sum(s / n for s, n in losses) / len(losses)     # mean of the windows' means
    else:
        mean_nll = sum(s for s, _ in losses) / scored               # token-weighted
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": scored, "windows": len(windows),
            "context_length": context, "stride": stride}


# -----------------------------------------------------------------------------
# LAMBADA last-word accuracy

def split_last_word(text: str) -> tuple[str, str] | None:
    """(context, " word"): the word is the text after the last space. None if there is no space."""
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
        return None
    return text[:cut], text[cut:]


@torch.no_grad()
def lambada_accuracy(model, texts: list[str], enc, batch_size: int = 8, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, desc: str = "lambada") -> dict:
    """Last-word accuracy: an example is right when every token of the final word
    is the greedy (argmax) prediction given the passage before it (and the
    word's earlier tokens). Also the per-word perplexity exp(mean word NLL).

    Context and word are tokenised separately (" word" with its space), and the
    context is cut from the left to fit the block size."""
    examples = []
    for t in texts:
        parts = split_last_word(t)
        if parts is not None:
            ctx, word = (enc.encode_ordinary(p) for p in parts)
            if ctx and word:
                examples.append((ctx, word))
    if not examples:
        raise ValueError("no LAMBADA example with a context and a final word (text after the last space)")
    block = model.config.block_size
    correct, word_nll = 0, 0.0
    batches = [examples[j:j + batch_size] for j in range(0, len(examples), batch_size)]
    with frozen_kron_weights(model):   # a materialised Kronecker W built once, not per batch
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 2):
            seqs = [(ctx + word)[:-1][-block:] for ctx, word in batch]   # inputs; targets are their shifts
            T = max(len(s) for s in seqs)
            # right padding: causal attention keeps the real positions unaffected by the pad
            x = torch.zeros(len(seqs), T, dtype=torch.long)
            for row, s in enumerate(seqs):
                x[row, :len(s)] = torch.tensor(s)
            with autocast(device, dtype):
                logits, _ = model(x.to(device))
            logits = logits.float()
            for row, ((_, word), s) in enumerate(zip(batch, seqs)):
                n = len(word)
                pred = logits[row, len(s) - n:len(s)]                    # (n, vocab): predictions of the word
                target = torch.tensor(word, device=pred.device)
                correct += int(torch.equal(pred.argmax(-1), target))
                word_nll += F.cross_entropy(pred, target, reduction="sum").item()
    return {"accuracy": correct / len(examples), "examples": len(examples), "correct": correct,
            "last_word_ppl": math.exp(word_nll / len(examples))}


# -----------------------------------------------------------------------------
# Driver

def eval_dtype(name: str, protocol: str, device: torch.device, log=print) -> torch.dtype:
    """The evaluation dtype: "auto" is float32 for the paper protocol (the published numbers),
    else runtime.pick_dtype's choice (bfloat16 autocast on a CUDA GPU that has it)."""
    if name == "auto" and protocol == "paper":
        return torch.float32
    return pick_dtype(name, device, log)


def check_model_names(specs: list[str]) -> None:
    """Resolve every --model (checkpoints.resolve_model: nothing is loaded or downloaded), so a
    mistyped path fails before any dataset is read."""
    for spec in specs:
        resolve_model(spec)


def check_writable(path: str) -> None:
    """Fail now, not after the evaluation, when the results cannot be written to `path`."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name, e.g. {os.path.join(path, 'results.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write in {directory} ({e.strerror or e}); choose another "
                         "path") from None


def load_model(spec: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    return checkpoints.load_model(spec).to(device).eval()


def evaluate(model, model_name: str, dataset: str, rows: list[str] | list[int], enc, protocol: str = "paper",
             context: int | None = None, stride: int | None = None, batch_size: int = 8,
             device: str = "cpu", dtype: torch.dtype = torch.float32, limit_tokens: int | None = None) -> dict:
    """One result record: perplexity (and LAMBADA accuracy) of one model on one dataset's rows
    (text rows, joined and tokenised; or the token ids of a token file, used as they are)."""
    tokens = rows if dataset.endswith(".bin") else tokenize_joined(rows, enc)
    if tokens and max(tokens) >= model.config.vocab_size:
        raise ValueError(f"{dataset} holds token id {max(tokens)}, beyond the vocabulary of {model_name} "
                         f"({model.config.vocab_size}): it was tokenised for another model")
    if limit_tokens:
        tokens = tokens[:limit_tokens]
    res = perplexity(model, tokens, protocol, context, stride, batch_size, device, dtype,
                     desc=f"{os.path.basename(model_name.rstrip('/'))} {os.path.basename(dataset)}")
    record = {"model": model_name, "dataset": dataset, "protocol": protocol, "tokens": res["tokens"],
              "ppl": res["ppl"], "nll": res["nll"], "windows": res["windows"],
              "context_length": res["context_length"], "stride": res["stride"],
              "num_params": model.num_params(), "num_params_no_wpe": model.num_params(include_wpe=False),
              "dtype": dtype_name(dtype)}
    if is_lambada(dataset):
        texts = rows
        if limit_tokens:   # the passages whose tokens fit in the limit (at least one)
            texts, used = [], 0
            for t in rows:
                used += len(enc.encode_ordinary(t))
                if texts and used > limit_tokens:
                    break
                texts.append(t)
        record.update(lambada_accuracy(model, texts, enc, batch_size, device, dtype))
    return record


def markdown_table(records: list[dict]) -> str:
    lines = ["| model | params | dataset | protocol | context | stride | tokens scored | ppl | LAMBADA acc |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else ""
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.1f}M | {r['dataset']} | {r['protocol']} | "
                     f"{r['context_length']} | {r['stride']} | {r['tokens']:,} | {r['ppl']:.2f} | {acc} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description="Perplexity (and LAMBADA last-word accuracy) of GPT-2 style models.",
        epilog="Protocols: 'paper' = windows of --block_size tokens, stride = block size, "
               "ppl = exp(mean of window means) (the Krony-PT numbers); 'sliding' = windows every "
               "--stride tokens, only new tokens scored, token-weighted mean (lower, fairer).")
    p.add_argument("--model", action="append", required=True,
                   help="checkpoint file (.pt), run directory, local Hugging Face directory or hub name "
                        "(gpt2, distilgpt2, ...); repeat for a comparison table")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated, from: {', '.join(DATASETS)} (default wikitext-103,wikitext-2,lambada "
                        "unless --data_file is given)")
    p.add_argument("--data_file", action="append", default=[],
                   help="local text file, one dataset row per line (WikiText's format), or .jsonl with a "
                        "'text' field per row (LAMBADA's format; last-word accuracy is reported too), or a prepared "
                        "token file (train.bin / val.bin of prepare_owt.py, scored as it is); repeatable")
    p.add_argument("--split", default=None, help="dataset split (default: test)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                   help="paper (default: the published numbers' protocol) or sliding")
    p.add_argument("--stride", type=int, default=None,
                   help="stride of --protocol sliding (default: half the context, 512 for GPT-2)")
    p.add_argument("--block_size", type=int, default=None,
                   help="context length in tokens (default: the model's block size, 1024 for GPT-2)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="precision of the evaluation (recorded in every result). auto = float32 for "
                        "--protocol paper (as the published numbers); for sliding, bfloat16 autocast on a CUDA "
                        "GPU that supports it, else float32")
    p.add_argument("--limit_tokens", type=int, default=None,
                   help="evaluate only the first N tokens of each dataset (quick runs; not comparable)")
    p.add_argument("--out", default=None, help="write the records as a JSON list here")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.limit_tokens is not None and args.limit_tokens < 2:
        raise ValueError(f"--limit_tokens {args.limit_tokens}: must be >= 2 (perplexity needs two tokens)")
    if args.block_size is not None and args.block_size < 2:
        raise ValueError(f"--block_size {args.block_size}: must be >= 2 tokens")
    if args.stride is not None:
        if args.protocol != "sliding":
            raise ValueError("--stride applies to --protocol sliding only (the paper protocol's stride is the "
                             "block size); drop --stride or add --protocol sliding")
        if args.stride < 1:
            raise ValueError(f"--stride {args.stride}: must be >= 1 (and below the context length)")
        if args.block_size is not None and args.stride >= args.block_size:
            raise ValueError(f"--stride {args.stride} must be below --block_size {args.block_size}, or tokens "
                             "would be scored without context")
    if args.datasets is None:
        args.datasets = "" if args.data_file else "wikitext-103,wikitext-2,lambada"
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    # every check before anything is loaded: a mistake should not wait for a download
    for d in args.datasets:
        if d not in DATASETS:
            raise ValueError(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)} "
                             "or evaluate a local file with --data_file PATH")
    check_model_names(args.model)
    if args.out:
        check_writable(args.out)
    device = pick_device(args.device)
    dtype = eval_dtype(args.dtype, args.protocol, device, log=lambda m: print(m, file=sys.stderr))
    data = [(path, read_token_file(path) if path.endswith(".bin") else read_data_file(path))
            for path in args.data_file]                   # a bad file fails before the tokenizer loads
    text = [p for p in args.data_file if not p.endswith(".bin")] + args.datasets
    enc = gpt2_encoding() if text else None             # token files need no tokenizer
    data += [(d, load_rows(d, args.split)) for d in args.datasets]
    records = []
    for spec in args.model:
        model = load_model(spec, device)
        for name, rows in data:
            r = evaluate(model, spec, name, rows, enc, args.protocol, args.block_size, args.stride,
                         args.batch_size, device, dtype, args.limit_tokens)
            records.append(r)
            acc = f", last-word accuracy {100 * r['accuracy']:.2f}% of {r['examples']}" if "accuracy" in r else ""
            print(f"{spec} on {name}: ppl {r['ppl']:.3f} ({r['protocol']} protocol, {r['tokens']:,} tokens "
                  f"scored, context {r['context_length']}, stride {r['stride']}){acc}", file=sys.stderr)
        del model
    print(markdown_table(records))
    if args.out:
        write_json(records, args.out)
        print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    run_cli(main)
