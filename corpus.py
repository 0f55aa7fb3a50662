"""
Text to token files: a corpus (a Hugging Face hub dataset such as OpenWebText, or local .txt,
.jsonl, .json or .parquet files) tokenised with GPT-2's BPE into train.bin / val.bin / meta.json,
the layout data.py documents and reads. prepare_owt.py is its command line; train.py calls
prepare() when a config's data_prepare asks for it.

The output is one transaction (data.output_lock, data.new_output): a run killed at any moment
leaves the previous output or none. The hub's script-based datasets are read from their
auto-converted Parquet copy where the canonical name fails (datasets 4 refuses scripts).
"""
from __future__ import annotations

import codecs
import errno
import glob
import os
import re
import shlex
import shutil
import time
from typing import Iterator

import numpy as np

from data import (DTYPE, EOT, HEADER_BYTES, LOCAL_CACHE, OWT, SPLITS, VOCAB_SIZE, DataError, check_out,
                  checksum_files, finished, gpt2_encoding, header_sha256, new_output, one_line, output_lock)
from storage import DiskFull, atomic_write, write_json

TXT_DOCS = ("paragraph", "file", "line")
LOCAL_EXTS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def tokenize_batch(batch: dict, text_column: str) -> dict:
    """datasets.map(batched=True) worker: text -> ids + [EOT] and their length."""
    enc = gpt2_encoding()
    texts = [t if t is not None else "" for t in batch[text_column]]
    ids = [doc + [EOT] for doc in enc.encode_ordinary_batch(texts, num_threads=1)]
    return {"ids": ids, "len": [len(d) for d in ids]}


# -----------------------------------------------------------------------------
# Download

def download(url: str, path: str, log=print) -> str:
    """Fetch url to path unless it is there already; atomic (a killed download leaves no
    partial file at `path`), and a DataError naming the URL when it cannot be fetched."""
    if os.path.isfile(path):
        return path
    import urllib.request
    log(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            atomic_write(path, lambda f: shutil.copyfileobj(response, f, 1 << 20))
    except DiskFull:
        raise
    except (OSError, ValueError) as e:      # URLError and timeouts are OSErrors; ValueError: not a URL
        raise DataError(f"could not download {url} ({type(e).__name__}: {one_line(e, 200)}); put the file "
                        f"at {path} yourself, or prepare from a local text file instead") from e
    return path


# -----------------------------------------------------------------------------
# Sources: local files or the Hugging Face hub

def local_files(source: str) -> list[str]:
    """The files a local --dataset names (a file, a directory, or a glob); [] if it is not local."""
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if os.path.splitext(f)[1] in LOCAL_EXTS)
        if not files:
            raise DataError(f"{source} holds no {', '.join(LOCAL_EXTS)} files")
        return files
    if os.path.isfile(source):
        return [source]
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise DataError(f"no files match {source}")
        return files
    if os.path.splitext(source)[1] in LOCAL_EXTS or source.startswith((".", "/", "~")):
        raise DataError(f"no such file or directory: {source}")
    return []


def local_kind(files: list[str]) -> str:
    """'txt', 'json' or 'parquet': the one kind all the local files are."""
    kinds = {LOCAL_EXTS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"local input must be all .txt, all .jsonl/.json or all .parquet files; got {files[:5]}")
    return kinds.pop()


def check_input_file(path: str, text: bool) -> None:
    """Refuse an empty file, and a text file that is blank or not UTF-8, naming it (one streaming
    pass over the file, before any tokenisation)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DataError(f"{path} is empty (0 bytes): there is nothing to prepare; remove it or pick "
                                "another --dataset")
            if text and not _utf8_with_text(f, path):
                raise DataError(f"{path} holds only whitespace: there is no document in it; remove it or "
                                "pick another --dataset")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _utf8_with_text(f, path: str) -> bool:
    """Whether the file holds any non-whitespace; a DataError at its first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    while True:
        chunk = f.read(1 << 24)
        try:
            decoded = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            at = offset - (len(e.object) - len(chunk)) + e.start    # e.object: held-back bytes + chunk
            raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {at:,}); "
                            f"convert it first, e.g. iconv -f latin1 -t utf-8 {shlex.quote(path)} > "
                            "converted.txt") from None
        has_text = has_text or (decoded != "" and not decoded.isspace())
        if not chunk:
            return has_text
        offset += len(chunk)


def txt_documents(files: list[str], txt_docs: str) -> Iterator[dict]:
    """Documents of plain-text files (see --txt_docs), streamed file by file."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if txt_docs == "file":
            docs = [text] if text.strip() else []
        elif txt_docs == "line":
            docs = [line for line in text.splitlines() if line.strip()]
        else:  # paragraphs: split at one or more blank (whitespace-only) lines
            docs = [p.strip("\n") for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
            docs = [p for p in docs if p.strip()]
        for doc in docs:
            yield {"text": doc}


def load_local(files: list[str], text_column: str, txt_docs: str, cache_dir: str):
    """A `datasets` Dataset of local files (its cache in cache_dir) and the column holding the text.
    A library error reading them becomes a DataError naming the files."""
    import datasets
    kind = local_kind(files)
    try:
        if kind == "txt":
            ds = datasets.Dataset.from_generator(txt_documents, gen_kwargs={"files": files, "txt_docs": txt_docs},
                                                 cache_dir=cache_dir)
            return ds, "text"
        return datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir), text_column
    except Exception as e:
        # the library wraps what went wrong (our own DataError, a full disk) in its own errors
        for cause in _causes(e):
            if isinstance(cause, DataError) or getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                raise cause from None
        names = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        raise DataError(f"could not read {names} as {kind} ({type(e).__name__}: {one_line(e, 300)})") from e


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def hub_error(name: str, e: Exception) -> DataError:
    return DataError(
        f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {one_line(e)}). "
        "Offline or behind a firewall? Prepare from local files instead: "
        "python prepare_owt.py --dataset PATH.txt|PATH.jsonl|PATH.parquet|DIR [--text_column COL] --out DIR "
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
              f"({one_line(e, 200)}); retrying with revision='refs/convert/parquet', the hub's Parquet copy")
        try:
            return datasets.load_dataset(name, config, split=split, num_proc=num_proc,
                                         revision="refs/convert/parquet")
        except Exception as e2:
            raise hub_error(name, e2) from e2


def reserve(fd: int, size: int) -> None:
    """Allocate `size` bytes for a file that will be written through a memmap: a full disk is then
    an OSError (storage.DiskFull) here, not a SIGBUS when a page of the memmap is written back."""
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:          # no posix_fallocate (macOS): the memmap grows the file itself
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def write_bin(ds, path: str, desc: str, shard_docs: int = 8192) -> int:
    """Concatenate ds['ids'] into a uint16 memmap at `path`, one shard of documents at a time
    (never the whole split in memory). Returns the number of tokens."""
    from tqdm import tqdm
    total = int(np.sum(ds["len"], dtype=np.int64))
    with open(path, "wb") as f:
        reserve(f.fileno(), total * np.dtype(DTYPE).itemsize)
    arr = np.memmap(path, dtype=DTYPE, mode="r+", shape=(total,))
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
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return total


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random set of documents for validation; both splits keep the source order."""
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def check_prepare_args(val_fraction: float, num_proc: int | None, txt_docs: str) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise DataError(f"--num_proc must be an integer >= 1, got {num_proc!r}")
    if txt_docs not in TXT_DOCS:
        raise DataError(f"--txt_docs must be one of {TXT_DOCS}, got {txt_docs!r}")


def prepare(dataset: str = OWT, out: str = "data/openwebtext", text_column: str = "text",
            split: str = "train", config: str | None = None, val_fraction: float = 0.0005,
            num_proc: int | None = None, txt_docs: str = "paragraph", seed: int = 2357,
            overwrite: bool = False) -> dict:
    """Tokenise `dataset` into out/train.bin, out/val.bin and out/meta.json, all replaced in one
    transaction; returns the meta dict. A finished output is left alone unless overwrite."""
    check_prepare_args(val_fraction, num_proc, txt_docs)
    out_arg, out = out, os.path.realpath(out)      # a symlinked output directory stays where it points
    check_out(out)
    with output_lock(out):
        done = None if overwrite else finished(out)
        if done:
            print(f"{out_arg} already holds a finished dataset ({done['train_tokens']:,} train + "
                  f"{done['val_tokens']:,} val tokens from {done['source']}); nothing to do. Use --overwrite to "
                  "prepare it again.")
            return done
        files = local_files(dataset)
        kind = local_kind(files) if files else None
        for f in files:
            check_input_file(f, text=kind != "parquet")
        gpt2_encoding()                                       # fail early (offline, no cache) and clearly
        t0 = time.time()
        with new_output(out) as tmp:
            meta = _prepare_into(tmp, dataset, files, text_column, split, config, val_fraction, num_proc,
                                 txt_docs, seed)
    print(f"wrote {out_arg}: train.bin {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
          f"val.bin {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents) in "
          f"{time.time() - t0:.1f}s")
    return meta


def _prepare_into(tmp: str, dataset: str, files: list[str], text_column: str, split: str,
                  config: str | None, val_fraction: float, num_proc: int | None, txt_docs: str,
                  seed: int) -> dict:
    """prepare()'s work, written into the (temp) directory tmp."""
    import datasets
    cache = os.path.join(tmp, LOCAL_CACHE)
    if files:
        print(f"reading {len(files)} local file(s) from {dataset}")
        ds, column = load_local(files, text_column, txt_docs, cache)
    else:
        print(f"loading {dataset} (split {split}) from the Hugging Face hub")
        ds, column = load_hub(dataset, config, split, num_proc), text_column
    if column not in ds.column_names:
        raise DataError(f"{dataset} has no column {column!r}; its columns are {ds.column_names}. "
                        "Pick one with --text_column.")
    if len(ds) < 2:
        raise DataError(f"{dataset} holds {len(ds)} document(s); need at least 2 (one for validation)")
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16")),
                                  "len": datasets.Value("int64")})
    tokenized = ds.map(tokenize_batch, fn_kwargs={"text_column": column}, batched=True, batch_size=1000,
                       remove_columns=ds.column_names, features=features,
                       num_proc=num_proc if num_proc and num_proc > 1 else None, desc="tokenizing")
    train_idx, val_idx = split_indices(len(tokenized), val_fraction, seed)
    counts = {name: write_bin(tokenized.select(idx), os.path.join(tmp, f"{name}.bin"), f"writing {name}.bin")
              for name, idx in (("train", train_idx), ("val", val_idx))}
    n_docs = len(tokenized)
    del ds, tokenized
    shutil.rmtree(cache, ignore_errors=True)
    meta = {
        "tokenizer": "gpt2", "library": "tiktoken", "vocab_size": VOCAB_SIZE, "eot_token": EOT,
        "dtype": np.dtype(DTYPE).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
        "header_bytes": HEADER_BYTES,
        "header_sha256": {s: header_sha256(os.path.join(tmp, f"{s}.bin")) for s in SPLITS},
        "sha256": checksum_files(tmp, {"dtype": np.dtype(DTYPE).name}),
        "train_documents": int(len(train_idx)), "val_documents": int(len(val_idx)),
        "documents": int(n_docs), "source": dataset, "split": split if not files else None,
        "text_column": column, "txt_docs": txt_docs if files and column == "text" else None,
        "val_fraction": val_fraction, "seed": seed,
    }
    write_json(meta, os.path.join(tmp, "meta.json"))
    return meta
