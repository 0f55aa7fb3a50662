"""
Generate text from one of our checkpoints or a Hugging Face GPT-2.

    python sample.py --model gpt2 --prompt "The meaning of life is" --num_samples 3
    python sample.py --model out-krony81m-finetune --prompt_file prompt.txt --temperature 0.8 --top_p 0.95
    python sample.py --model distilgpt2 --interactive

Generation keeps a KV cache (GPT.generate), so each new token costs one
position; past the block size the context slides. --temperature 0 is greedy.
Tokens per second are printed to stderr at the end.
"""
from __future__ import annotations

import storage  # first: stdlib only, so that Ctrl-C while torch loads is one line

if __name__ == "__main__":
    storage.exit_quietly_on_ctrl_c()

import argparse
import os
import sys
import time

import torch

from data import gpt2_encoding
from checkpoints import load_model, resolve_model
from runtime import ArgumentParser, DEVICE_HELP, DTYPES, dtype_name, pick_device, pick_dtype, run_cli, sync


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Sample text from a GPT-2 style model (KV-cached generation).")
    p.add_argument("--model", required=True,
                   help="checkpoint file (.pt), run directory, local Hugging Face directory or hub name")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file instead")
    p.add_argument("--interactive", action="store_true", help="a prompt loop: type a prompt, get samples")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens generated per sample (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling's random generator (default 1337)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 autocast on a CUDA GPU that supports it, else float32")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for values argparse's types let through, before the model is loaded."""
    if args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if not 0 <= args.temperature < float("inf"):   # nan too; inf would sample uniformly, not from the model
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k {args.top_k}: must be >= 1 (leave it out to keep every token)")
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        raise FileNotFoundError(f"--prompt_file {args.prompt_file}: no such file")
    if args.interactive and args.prompt_file is not None:
        raise ValueError("--interactive reads its prompts from the terminal; drop --prompt_file")


def read_prompt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt_file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start:,})") from None


def sample(model, enc, prompt: str, num_samples: int = 1, max_new_tokens: int = 200,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           device: torch.device | str = "cpu", use_cache: bool = True,
           generator: torch.Generator | None = None) -> tuple[list[str], int, float]:
    """num_samples continuations of prompt; returns (texts, new tokens generated, seconds)."""
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]   # an empty prompt starts a document
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    start = time.perf_counter()
    out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, use_cache=use_cache,
                         generator=generator)
    sync(device)
    seconds = time.perf_counter() - start
    texts = [enc.decode(row[len(ids):].tolist()) for row in out]
    return texts, num_samples * max_new_tokens, seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    resolve_model(args.model)               # a mistyped name fails before anything is loaded
    prompt = read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, log=lambda m: print(m, file=sys.stderr))
    enc = gpt2_encoding()
    # the weights themselves in dtype (not autocast): the KV cache then has the same dtype
    model = load_model(args.model).to(device).eval().to(dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    total_tokens, total_seconds = 0, 0.0

    def run(text: str) -> None:
        nonlocal total_tokens, total_seconds
        texts, n, s = sample(model, enc, text, args.num_samples, args.max_new_tokens, args.temperature,
                             args.top_k, args.top_p, device, not args.no_cache, generator)
        total_tokens, total_seconds = total_tokens + n, total_seconds + s
        for t in texts:
            print(text + t)
            print("-" * 40)

    if args.interactive:
        print("Type a prompt and press Enter (empty line or Ctrl-D to quit).", file=sys.stderr)
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
            run(text)
    else:
        run(prompt)
    if total_seconds > 0:
        print(f"{total_tokens} tokens in {total_seconds:.2f} s: {total_tokens / total_seconds:.1f} tokens/s "
              f"({'KV cache' if not args.no_cache else 'no cache'}, {device}, {dtype_name(dtype)})",
              file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
