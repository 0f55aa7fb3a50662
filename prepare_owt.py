"""
Tokenise OpenWebText (or any text dataset) into train.bin / val.bin for train.py.

    python prepare_owt.py                                   # OpenWebText from the hub -> data/openwebtext
    python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out data/shakespeare
    python prepare_owt.py --dataset corpus.jsonl --text-column body --out data/mine
    python prepare_owt.py --dataset some/hf-dataset --split train --text-column text --out data/x

Output, in --out:
  train.bin, val.bin  GPT-2 BPE token ids as a flat uint16 array (np.memmap), each
                      document followed by the end-of-text token 50256
  meta.json           tokenizer, dtype, token and document counts, source

Documents. A hub dataset, .jsonl or .parquet file: one row is one document (the
--text-column). A .txt file: --txt-docs says what a document is:
  paragraph (default)  the text between blank lines (the blank lines themselves are dropped)
  file                 the whole file (give a directory or several files for many documents)
  line                 every non-empty line

Safety. The bins are written shard by shard to temp files and renamed at the end,
and meta.json is written last, so an interrupted run leaves no output that looks
finished; just run the command again (the tokenisation of a hub dataset is cached
by `datasets` and is not redone). A finished output is detected and left alone
unless --overwrite.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

OWT = "Skylion007/openwebtext"
EOT = 50256                      # GPT-2's <|endoftext|>
VOCAB_SIZE = 50257               # fits uint16 (< 65536)
DTYPE = np.uint16
TXT_DOCS = ("paragraph", "file", "line")
LOCAL_EXTS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_TIKTOKEN_CACHE = os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache")


class PrepareError(RuntimeError):
    """A problem the user can fix (bad path, offline, ...); main() prints it without a traceback."""


# -----------------------------------------------------------------------------
# Tokenizer

_ENC = None


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (cached per process). Offline, tiktoken needs its cache
    files: TIKTOKEN_CACHE_DIR, or the repository's ../shared/tiktoken_cache when present."""
    global _ENC
    if _ENC is None:
        if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_TIKTOKEN_CACHE):
            os.environ["TIKTOKEN_CACHE_DIR"] = SHARED_TIKTOKEN_CACHE
        import tiktoken
        try:
            _ENC = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the BPE files on first use
            raise PrepareError(
                f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken downloads its BPE "
                "files on first use; offline, set TIKTOKEN_CACHE_DIR to a directory holding them "
                "(e.g. TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache).") from e
    return _ENC


def tokenize_batch(batch: dict, text_column: str) -> dict:
    """datasets.map(batched=True) worker: text -> ids + [EOT] and their length."""
    enc = gpt2_encoding()
    texts = [t if t is not None else "" for t in batch[text_column]]
    ids = [doc + [EOT] for doc in enc.encode_ordinary_batch(texts, num_threads=1)]
    return {"ids": ids, "len": [len(d) for d in ids]}


# -----------------------------------------------------------------------------
# Sources: local files or the Hugging Face hub

def local_files(source: str) -> list[str]:
    """The files a local --dataset names (a file, a directory, or a glob); [] if it is not local."""
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if os.path.splitext(f)[1] in LOCAL_EXTS)
        if not files:
            raise PrepareError(f"{source} holds no {', '.join(LOCAL_EXTS)} files")
        return files
    if os.path.isfile(source):
        return [source]
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise PrepareError(f"no files match {source}")
        return files
    if os.path.splitext(source)[1] in LOCAL_EXTS or source.startswith((".", "/", "~")):
        raise PrepareError(f"no such file or directory: {source}")
    return []


def txt_documents(files: list[str], txt_docs: str) -> Iterator[dict]:
    """Documents of plain-text files (see --txt-docs), streamed file by file."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if txt_docs == "file":
            docs = [text]
        elif txt_docs == "line":
            docs = [line for line in text.splitlines() if line.strip()]
        else:  # paragraphs: split at one or more blank (whitespace-only) lines
            docs = [p.strip("\n") for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
            docs = [p for p in docs if p.strip()]
        for doc in docs:
            yield {"text": doc}


def load_local(files: list[str], text_column: str, txt_docs: str, cache_dir: str):
    import datasets
    kinds = {LOCAL_EXTS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise PrepareError(f"local input must be all .txt, all .jsonl/.json or all .parquet files; got {files[:5]}")
    kind = kinds.pop()
    if kind == "txt":
        # size and mtime in gen_kwargs make the `datasets` cache notice an edited file
        stamp = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        ds = datasets.Dataset.from_generator(_txt_gen, gen_kwargs={"stamp": stamp, "txt_docs": txt_docs},
                                             cache_dir=cache_dir)
        return ds, "text"
    ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir)
    return ds, text_column


def _txt_gen(stamp: list, txt_docs: str) -> Iterator[dict]:
    yield from txt_documents([s[0] for s in stamp], txt_docs)


def hub_error(name: str, e: Exception) -> PrepareError:
    return PrepareError(
        f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:500]}). "
        "Offline or behind a firewall? Prepare from local files instead: "
        "python prepare_owt.py --dataset PATH.txt|PATH.jsonl|PATH.parquet|DIR [--text-column COL] --out DIR "
        "(e.g. --dataset ../shared/data/tinyshakespeare.txt). "
        "A hub dataset downloaded elsewhere can be copied into ~/.cache/huggingface and used with HF_HUB_OFFLINE=1.")


def load_hub(name: str, config: str | None, split: str, num_proc: int | None):
    """load_dataset(name); a script-based dataset (refused by datasets >= 4, e.g. the old
    openwebtext.py) is retried from the hub's auto-converted Parquet branch."""
    import datasets
    try:
        return datasets.load_dataset(name, config, split=split, num_proc=num_proc)
    except Exception as e:
        if "script" not in str(e).lower():
            raise hub_error(name, e) from e
        print(f"{name} is a script-based dataset, which datasets {datasets.__version__} refuses "
              f"({str(e)[:200]}); retrying with revision='refs/convert/parquet', the hub's Parquet copy")
        try:
            return datasets.load_dataset(name, config, split=split, num_proc=num_proc,
                                         revision="refs/convert/parquet")
        except Exception as e2:
            raise hub_error(name, e2) from e2


# -----------------------------------------------------------------------------
# Output

def finished(out: str) -> dict | None:
    """meta.json of a finished output in `out` (bins present with the sizes it records), else None."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        ok = all(os.path.getsize(os.path.join(out, f"{s}.bin")) == meta[f"{s}_tokens"] * np.dtype(DTYPE).itemsize
                 for s in ("train", "val"))
        return meta if ok else None
    except (OSError, KeyError, ValueError):
        return None


def write_bin(ds, path: str, desc: str, shard_docs: int = 8192) -> int:
    """Concatenate ds['ids'] into a uint16 memmap at `path`, one shard of documents at a time
    (never the whole split in memory); temp file + rename, so `path` is never half-written."""
    total = int(np.sum(ds["len"], dtype=np.int64))
    tmp = path + ".tmp"
    arr = np.memmap(tmp, dtype=DTYPE, mode="w+", shape=(total,))
    pos = 0
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True) as bar:
        for start in range(0, len(ds), shard_docs):
            shard = ds[start:start + shard_docs]["ids"]      # list of per-document id lists
            chunk = np.concatenate([np.asarray(d, dtype=DTYPE) for d in shard])
            arr[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
            bar.update(len(chunk))
    assert pos == total, (pos, total)
    arr.flush()
    del arr
    os.replace(tmp, path)
    return total


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random set of documents for validation; both splits keep the source order."""
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def prepare(dataset: str = OWT, out: str = "data/openwebtext", text_column: str = "text",
            split: str = "train", config: str | None = None, val_fraction: float = 0.0005,
            num_proc: int | None = None, txt_docs: str = "paragraph", seed: int = 2357,
            overwrite: bool = False) -> dict:
    """Tokenise `dataset` into out/train.bin, out/val.bin and out/meta.json; returns the meta dict."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if txt_docs not in TXT_DOCS:
        raise PrepareError(f"--txt-docs must be one of {TXT_DOCS}, got {txt_docs!r}")
    done = finished(out)
    if done and not overwrite:
        print(f"{out} already holds a finished dataset ({done['train_tokens']:,} train + {done['val_tokens']:,} "
              f"val tokens from {done['source']}); nothing to do. Use --overwrite to prepare it again.")
        return done
    gpt2_encoding()                                           # fail early (offline, no cache) and clearly
    files = local_files(dataset)
    local_cache = os.path.join(out, ".hf_cache")
    t0 = time.time()
    if files:
        print(f"reading {len(files)} local file(s) from {dataset}")
        ds, column = load_local(files, text_column, txt_docs, local_cache)
    else:
        print(f"loading {dataset} (split {split}) from the Hugging Face hub")
        ds, column = load_hub(dataset, config, split, num_proc), text_column
    if column not in ds.column_names:
        raise PrepareError(f"{dataset} has no column {column!r}; its columns are {ds.column_names}. "
                           "Pick one with --text-column.")
    if len(ds) < 2:
        raise PrepareError(f"{dataset} holds {len(ds)} document(s); need at least 2 (one for validation)")
    import datasets
    os.makedirs(out, exist_ok=True)
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16")),
                                  "len": datasets.Value("int64")})
    tokenized = ds.map(tokenize_batch, fn_kwargs={"text_column": column}, batched=True, batch_size=1000,
                       remove_columns=ds.column_names, features=features, num_proc=num_proc,
                       desc="tokenizing")
    train_idx, val_idx = split_indices(len(tokenized), val_fraction, seed)
    counts = {}
    for name, idx in (("train", train_idx), ("val", val_idx)):
        counts[name] = write_bin(tokenized.select(idx), os.path.join(out, f"{name}.bin"), f"writing {name}.bin")
    meta = {
        "tokenizer": "gpt2", "library": "tiktoken", "vocab_size": VOCAB_SIZE, "eot_token": EOT,
        "dtype": np.dtype(DTYPE).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
        "train_documents": int(len(train_idx)), "val_documents": int(len(val_idx)),
        "documents": int(len(tokenized)), "source": dataset, "split": split if not files else None,
        "text_column": column, "txt_docs": txt_docs if files and column == "text" else None,
        "val_fraction": val_fraction, "seed": seed,
    }
    tmp = os.path.join(out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out, "meta.json"))          # last: marks the output finished
    shutil.rmtree(local_cache, ignore_errors=True)
    print(f"wrote {out}: train.bin {counts['train']:,} tokens ({len(train_idx):,} documents), "
          f"val.bin {counts['val']:,} tokens ({len(val_idx):,} documents) in {time.time() - t0:.1f}s")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Tokenise a text dataset with the GPT-2 BPE into train.bin / val.bin (uint16) + meta.json.",
        epilog="Examples: python prepare_owt.py  (OpenWebText, ~9B tokens, ~17 GB)  |  "
               "python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out data/shakespeare")
    p.add_argument("--dataset", default=OWT,
                   help=f"Hugging Face dataset name, or a local .txt/.jsonl/.parquet file, directory or glob "
                        f"(default: {OWT})")
    p.add_argument("--out", default="data/openwebtext", help="output directory (default: data/openwebtext)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--split", default="train", help="split of a hub dataset to read (default: train)")
    p.add_argument("--config", default=None, help="configuration name of a hub dataset, if it has several")
    p.add_argument("--val-fraction", type=float, default=0.0005,
                   help="fraction of documents held out for val.bin (default: 0.0005, as nanoGPT)")
    p.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="processes for tokenisation (default: half the CPU cores)")
    p.add_argument("--txt-docs", choices=TXT_DOCS, default="paragraph",
                   help="what one document of a .txt file is: paragraph (text between blank lines, default), "
                        "file, or line")
    p.add_argument("--seed", type=int, default=2357, help="seed of the random validation split")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output")
    args = p.parse_args(argv)
    try:
        prepare(args.dataset, args.out, args.text_column, args.split, args.config, args.val_fraction,
                args.num_proc if args.num_proc > 1 else None, args.txt_docs, args.seed, args.overwrite)
    except PrepareError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
