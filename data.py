"""
Token data: the GPT-2 tokenizer, the files of a prepared directory (train.bin / val.bin /
meta.json) and their checks, the transaction that writes them (corpus.py tokenises text into
it; write_token_files writes arrays), and TokenData, which reads them back for train.py.

A prepared directory holds
  train.bin, val.bin  GPT-2 BPE token ids as a flat uint16 array (np.memmap), each document
                      followed by the end-of-text token 50256
  meta.json           tokenizer, vocab_size, dtype, per split the token count, the sha256 of the
                      whole file and of its first HEADER_BYTES bytes, document counts, source
  .verified.json      which files were checked against meta.json, as they were then (see below)

One transaction. corpus.prepare() (and write_token_files()) build the whole directory beside its
destination and rename it into place at the end (storage.atomic_directory): a run killed at any
moment leaves the previous output or none, never new bins beside an old meta.json. Until the swap
the disk holds both, so an --overwrite needs room for a second copy. What a killed run leaves
beside the destination is removed by the next run, which also waits while another process
prepares the same directory (runs of a sweep that share a data_dir).

Checks on reading. TokenData refuses bins that do not match meta.json (their size, the checksum of
their first bytes, then the checksum of the whole file: a bin from another run, a truncated copy, a
tail overwritten) and bins holding a token id >= vocab_size, each with the command that prepares the
data again. Hashing a 17 GB train.bin takes a while, so it happens once per file: .verified.json
records each file's inode, size, mtime and ctime when it passed, and a file still the same is not
read again (a rewrite, a copy or a touch changes them). A meta.json without the whole-file
checksum (an older prepare_owt.py) is refused: prepare_owt.py --record_checksums adds it once.

Sampling uses a dedicated torch.Generator (not the global RNG), so train.py can save its state in
every checkpoint and a resumed run draws exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
from typing import Iterator

import numpy as np
import torch

from storage import TEMP_PREFIX, RunLock, atomic_directory, file_identity, file_sha256, write_json

OWT = "Skylion007/openwebtext"
EOT = 50256                      # GPT-2's <|endoftext|>
VOCAB_SIZE = 50257               # fits uint16 (< 65536)
DTYPE = np.uint16
TOKEN_DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")
HEADER_BYTES = 1 << 20           # meta.json checksums this many leading bytes of each bin
LOCAL_CACHE = ".hf_cache"        # the `datasets` cache of local files, inside the temp directory
LOCK_NAME = ".prepare.lock"
VERIFIED_NAME = ".verified.json"  # the files already checked against meta.json (see the docstring)
LARGE_FILE = 1 << 28             # verifying a file of this size or more is announced (it takes seconds)
# names in an output directory that are ours (today's or an older version's); anything else in it
# (e.g. the source text train.py downloads there) is carried into the new directory
OWN_NAMES = {"train.bin", "val.bin", "meta.json", LOCK_NAME, LOCAL_CACHE, VERIFIED_NAME,
             "train.bin.tmp", "val.bin.tmp", "meta.json.tmp"}
# the hub data sets eval_ppl.py scores, by name -> (hub dataset, config, split); here, so that study.py
# can check a study's names before anything trains
EVAL_DATASETS = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-v1", "test"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-v1", "test"),
    "wikitext-103-raw": ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"),
    "wikitext-2-raw": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "lambada": ("cimec/lambada", None, "test"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),   # "default" = English
}
REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_TIKTOKEN_CACHE = os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache")


class DataError(ValueError):
    """A data problem the user can fix (bad path, offline, files that do not match, ...);
    the scripts print its one-line message without a traceback."""




def prepare_command(out: str, source: str | None = None) -> str:
    """The command that (re)prepares `out`, for error messages."""
    dataset = f" --dataset {shlex.quote(source)}" if source and source != OWT else ""
    return f"python prepare_owt.py{dataset} --out {shlex.quote(out)} --overwrite"


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
            raise DataError(
                f"could not load the GPT-2 tokenizer ({type(e).__name__}: {one_line(e)}). tiktoken downloads "
                "its BPE files on first use; offline, set TIKTOKEN_CACHE_DIR to a directory holding them "
                "(e.g. TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache).") from e
    return _ENC


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's text on one line (library messages often span several)."""
    return " ".join(str(e).split())[:limit]


# -----------------------------------------------------------------------------
# meta.json and the checks of a prepared directory

def header_sha256(path: str, nbytes: int = HEADER_BYTES) -> str:
    """sha256 of the first nbytes bytes of a file (all of it when shorter)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(nbytes)).hexdigest()


def read_meta(data_dir: str) -> dict:
    """meta.json of a prepared directory, with the fields TokenData relies on checked."""
    path = os.path.join(data_dir, "meta.json")
    cmd = prepare_command(data_dir)
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} has no meta.json, so its token files cannot be checked: they were written "
                        f"by something else or by a run that did not finish. Prepare it again: {cmd} (token "
                        "arrays of your own: write them with data.write_token_files)")
    try:
        with open(path) as f:
            meta = json.load(f)
        cmd = prepare_command(data_dir, meta.get("source"))
        np.dtype(meta["dtype"])
        if meta["dtype"] not in TOKEN_DTYPES:
            raise ValueError(f"dtype {meta['dtype']!r} is not one of {TOKEN_DTYPES}")
        for key in ("vocab_size", *(f"{s}_tokens" for s in SPLITS)):
            if not isinstance(meta[key], int) or meta[key] < 1:
                raise ValueError(f"{key}={meta[key]!r} is no positive integer")
        for key in ("header_sha256", "sha256"):
            if not isinstance(meta.get(key, {}), dict):
                raise ValueError(f"{key} is no mapping of split to checksum")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid meta.json ({type(e).__name__}: {one_line(e, 200)}); "
                        f"prepare the data again: {cmd}") from None
    return meta


def check_files(data_dir: str, meta: dict, log=print) -> None:
    """Refuse bins that are not the ones meta.json describes: the size must be the token count
    times the item size, the header checksum (when meta.json has one) and the checksum of the whole
    file must agree, and every token id must be below vocab_size (see verify_file)."""
    check_sizes(data_dir, meta)
    cmd = prepare_command(data_dir, meta.get("source"))
    if any(not meta.get("sha256", {}).get(split) for split in SPLITS):
        raise DataError(f"{os.path.join(data_dir, 'meta.json')} records no checksum of the whole token files (an "
                        "older prepare_owt.py wrote it), so a damaged or swapped bin would go unnoticed. Record it "
                        f"once, after the checks that are possible: python prepare_owt.py --out "
                        f"{shlex.quote(data_dir)} --record_checksums; or prepare the data again: {cmd}")
    for split in SPLITS:
        verify_file(data_dir, meta, split, log)


def check_sizes(data_dir: str, meta: dict) -> None:
    """The cheap checks: each bin's size and the checksum of its first bytes."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    cmd = prepare_command(data_dir, meta.get("source"))
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        size, tokens = os.path.getsize(path), meta[f"{split}_tokens"]
        if size != tokens * itemsize:
            raise DataError(f"{path} holds {size:,} bytes but meta.json records {tokens:,} {meta['dtype']} tokens "
                            f"({tokens * itemsize:,} bytes): the file is truncated or not the one meta.json was "
                            f"written with. Prepare the data again: {cmd}")
        expected = meta.get("header_sha256", {}).get(split)
        nbytes = int(meta.get("header_bytes", HEADER_BYTES))
        if expected is not None and header_sha256(path, nbytes) != expected:
            raise DataError(f"{path} is not the file meta.json was written with (the checksum of its first "
                            f"{nbytes:,} bytes differs): a bin from another run or a damaged copy. "
                            f"Prepare the data again: {cmd}")


def scan_file(path: str, dtype: str, log=print) -> tuple[str, int]:
    """(sha256, largest token id) of a token file, in one streamed pass."""
    size, largest = os.path.getsize(path), [0]

    def biggest(chunk: memoryview) -> None:
        if len(chunk):
            largest[0] = max(largest[0], int(np.frombuffer(chunk, dtype=dtype).max()))
    if size >= LARGE_FILE:
        log(f"verifying {path} ({size / 1e9:.1f} GB) against meta.json; once, until the file changes")
    return file_sha256(path, each_chunk=biggest), largest[0]


def _read_verified(data_dir: str) -> dict:
    try:
        with open(os.path.join(data_dir, VERIFIED_NAME)) as f:
            found = json.load(f)
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verified(data_dir: str, records: dict) -> None:
    """Remember verified files; a directory we may not write (a shared, read-only data set) just
    means they are verified again next time."""
    with contextlib.suppress(OSError):
        write_json(records, os.path.join(data_dir, VERIFIED_NAME))


def verify_file(data_dir: str, meta: dict, split: str, log=print) -> None:
    """Check {split}.bin against meta.json's whole-file checksum and vocab_size, reading it only
    when it changed since it last passed (VERIFIED_NAME)."""
    path = os.path.join(data_dir, f"{split}.bin")
    expected, identity = meta["sha256"][split], file_identity(path)
    records = _read_verified(data_dir)
    seen = records.get(split)
    if isinstance(seen, dict) and seen.get("identity") == identity and seen.get("sha256") == expected \
            and isinstance(seen.get("max_id"), int) and seen["max_id"] < meta["vocab_size"]:
        return
    digest, largest = scan_file(path, meta["dtype"], log)
    cmd = prepare_command(data_dir, meta.get("source"))
    if digest != expected:
        raise DataError(f"{path} is not the file meta.json was written with (the checksum of the whole file "
                        f"differs): a bin from another run, or a damaged or partly overwritten copy. Prepare the "
                        f"data again: {cmd}")
    if largest >= meta["vocab_size"]:
        raise DataError(f"{path} holds token id {largest}, not below vocab_size={meta['vocab_size']} (meta.json): "
                        f"the file was not written for this tokenizer. Prepare the data again: {cmd}")
    records = _read_verified(data_dir)        # another process may have added the other split meanwhile
    records[split] = {"identity": identity, "sha256": digest, "max_id": largest}
    _write_verified(data_dir, records)


def record_checksums(data_dir: str, log=print) -> dict:
    """Add the whole-file checksums to the meta.json of a directory an older prepare_owt.py wrote,
    after every check that is possible without them: sizes, header checksums (where recorded) and
    token ids below vocab_size. Returns the new meta dict."""
    out = os.path.realpath(data_dir)
    with output_lock(out):
        meta = read_meta(out)
        check_sizes(out, meta)
        cmd = prepare_command(data_dir, meta.get("source"))
        sums = {}
        for split in SPLITS:
            path = os.path.join(out, f"{split}.bin")
            sums[split], largest = scan_file(path, meta["dtype"], log)
            if largest >= meta["vocab_size"]:
                raise DataError(f"{path} holds token id {largest}, not below vocab_size={meta['vocab_size']} "
                                f"(meta.json): it is damaged or was not written for this tokenizer. Prepare the "
                                f"data again: {cmd}")
        old = dict(meta.get("sha256", {}))
        if old and old != sums:
            raise DataError(f"{data_dir}: the files do not match the checksums meta.json records already; "
                            f"prepare the data again: {cmd}")
        meta["sha256"] = sums
        write_json(meta, os.path.join(out, "meta.json"))
    checked = "sizes, header checksums" if meta.get("header_sha256") else "sizes (no header checksums recorded)"
    log(f"recorded the checksums of {data_dir}/train.bin and val.bin in meta.json ({checked} and token ids "
        "checked; the files are trusted as they are from now on)")
    return meta


def finished(out: str) -> dict | None:
    """meta.json of a finished output in `out` (bins that match it), else None; a DataError for the
    output of an older prepare_owt.py (no whole-file checksums), which is neither."""
    try:
        meta = read_meta(out)
        check_sizes(out, meta)
    except (OSError, DataError):
        return None
    if any(not meta.get("sha256", {}).get(split) for split in SPLITS):
        check_files(out, meta)          # the error that says how to record the checksums
    try:
        check_files(out, meta)
        return meta
    except (OSError, DataError):
        return None


def checksum_files(directory: str, meta: dict, log=print) -> dict[str, str]:
    """The whole-file checksums of the bins just written into `directory` (they pass verify_file
    from now on, without another read)."""
    sums, records = {}, {}
    for split in SPLITS:
        path = os.path.join(directory, f"{split}.bin")
        if os.path.isfile(path):
            sums[split], largest = scan_file(path, meta["dtype"], log)
            records[split] = {"identity": file_identity(path), "sha256": sums[split], "max_id": largest}
    _write_verified(directory, records)
    return sums


# -----------------------------------------------------------------------------
# Output: one transaction per directory

def _own_temp_name(base: str) -> re.Pattern:
    """Names storage.atomic_directory gives the temp and old directories of `base`."""
    return re.compile(re.escape(TEMP_PREFIX + base) + r"\.(old\.)?[a-z0-9_]{8}")


def _foreign_entries(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n not in OWN_NAMES and not n.startswith(TEMP_PREFIX))


def check_out(out: str) -> None:
    """Refuse an --out that cannot be replaced whole: a file, or a directory holding
    sub-directories that are no part of a prepared dataset."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file; give the directory to write train.bin, val.bin and "
                        "meta.json into")
    dirs = [n for n in _foreign_entries(out) if not os.path.islink(os.path.join(out, n))
            and not os.path.isfile(os.path.join(out, n))]
    if dirs:
        raise DataError(f"--out {out} holds {', '.join(dirs[:5])}, which no prepared dataset has; the output is "
                        "replaced as a whole, so give it a directory of its own (new or empty)")


def _carry_foreign(out: str, new: str) -> None:
    """Hard-link (or copy) the files of `out` that are not ours into `new`, so the swap loses none."""
    for name in _foreign_entries(out):
        src, dst = os.path.join(out, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Exclusive use of `out` while it is prepared: storage.RunLock on out/LOCK_NAME. A second run
    waits for the first and then finds the output finished. Under the lock, what killed runs left
    beside `out` is removed. A directory created here is removed again if the block fails before
    filling it."""
    created = not os.path.isdir(out)
    parent, base = os.path.split(out)
    pattern = _own_temp_name(base)
    if created and os.path.isdir(parent):  # a kill between atomic_directory's renames leaves the old output here
        for name in sorted(os.listdir(parent)):
            old = os.path.join(parent, name)
            if pattern.fullmatch(name) and ".old." in name and os.path.isfile(os.path.join(old, "meta.json")):
                os.replace(old, out)
                print(f"restored {out} from {name}, left there by an interrupted run")
                created = False
                break
    lock = RunLock(out, LOCK_NAME, wait=f"{out} is being prepared by another process; waiting for it to finish")
    lock.acquire()
    ok = False
    try:
        for name in sorted(os.listdir(parent)):
            if pattern.fullmatch(name):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        yield
        ok = True
    finally:
        lock.release()
        if created and not ok and os.listdir(out) in ([], [LOCK_NAME]):
            with contextlib.suppress(OSError):
                os.remove(lock.path)
                os.rmdir(out)


@contextlib.contextmanager
def new_output(out: str) -> Iterator[str]:
    """A temp directory beside `out` that replaces it whole when the block succeeds, carrying over
    the files in `out` that are not ours (storage.atomic_directory: a failure or a kill before
    the end leaves `out` as it was)."""
    with atomic_directory(out) as tmp:
        yield tmp
        _carry_foreign(out, tmp)


def write_token_files(directory: str, splits: dict[str, np.ndarray], **meta) -> dict:
    """Write token arrays (e.g. {"train": ..., "val": ...}) as {split}.bin plus a meta.json that
    TokenData accepts, in one transaction like prepare(). `meta` adds to or overrides the recorded
    fields (vocab_size defaults to GPT-2's; ids must lie in [0, vocab_size)). Returns the meta dict."""
    vocab_size = int(meta.get("vocab_size", VOCAB_SIZE))
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if dtype.name not in TOKEN_DTYPES or vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"dtype {dtype.name} cannot hold token ids below vocab_size={vocab_size}; "
                        f"use one of {TOKEN_DTYPES} wide enough")
    arrays = {}
    for name, ids in splits.items():
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"split {name!r}: need a non-empty 1-D integer array, got shape {ids.shape} {ids.dtype}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DataError(f"split {name!r} holds token ids in [{ids.min()}, {ids.max()}], outside "
                            f"[0, vocab_size={vocab_size})")
        arrays[name] = ids.astype(dtype)
    out = os.path.realpath(directory)
    check_out(out)
    info = {"tokenizer": None, "vocab_size": vocab_size, "dtype": dtype.name, "source": "write_token_files",
            "header_bytes": HEADER_BYTES, "header_sha256": {}}
    with output_lock(out), new_output(out) as tmp:
        for name, ids in arrays.items():
            path = os.path.join(tmp, f"{name}.bin")
            ids.tofile(path)
            info[f"{name}_tokens"] = int(ids.size)
            info["header_sha256"][name] = header_sha256(path)
        info["sha256"] = checksum_files(tmp, info)
        info.update({k: v for k, v in meta.items() if k not in ("vocab_size", "dtype")})
        write_json(info, os.path.join(tmp, "meta.json"))
    return info


# -----------------------------------------------------------------------------
# Reading: batches for training

class TokenData:
    """The prepared token files of one directory, as read-only memmaps, checked against meta.json."""

    def __init__(self, data_dir: str, log=print):
        self.data_dir = data_dir
        missing = [s for s in SPLITS if not os.path.isfile(os.path.join(data_dir, f"{s}.bin"))]
        if missing:
            raise FileNotFoundError(
                f"no {' or '.join(s + '.bin' for s in missing)} in {data_dir!r}. Prepare the data first, e.g. "
                f"`python prepare_owt.py --out {data_dir}` (OpenWebText) or "
                f"`python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out {data_dir}`.")
        self.meta = read_meta(data_dir)
        check_files(data_dir, self.meta, log)
        self.vocab_size = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=dtype, mode="r") for s in SPLITS}

    def num_tokens(self, split: str) -> int:
        return len(self.splits[split])

    def check_block_size(self, block_size: int) -> None:
        for split, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise DataError(f"{self.data_dir}/{split}.bin holds {len(arr)} tokens, fewer than "
                                f"block_size + 2 = {block_size + 2}; use a smaller block_size or more data "
                                "(e.g. a larger --val_fraction in prepare_owt.py)")

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse data whose token ids may not fit the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise DataError(f"{self.data_dir} was prepared with vocab_size={self.vocab_size} (meta.json), more "
                            f"than the model's {model_vocab_size}: its token ids would index past the model's "
                            "embedding. Use a model with the data's tokenizer, or data prepared for this model")

    def sample_offsets(self, split: str, block_size: int, shape: tuple[int, ...],
                       generator: torch.Generator) -> torch.Tensor:
        """Random start positions of `shape` (e.g. (micro_steps, batch_size)) in `split`."""
        high = self.num_tokens(split) - block_size - 1
        return torch.randint(high + 1, shape, generator=generator)

    def batch(self, split: str, offsets: torch.Tensor, block_size: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, both (B, T) int64, for the B start positions in `offsets`.

        On CUDA the batch is pinned and copied with non_blocking=True, so the copy
        overlaps with whatever the GPU is still running."""
        arr = self.splits[split]
        rows = np.stack([arr[o:o + block_size + 1] for o in offsets.tolist()]).astype(np.int64)  # (B, T+1)
        if rows.max() >= self.vocab_size:   # on the host, before an embedding lookup would fail on the device
            cmd = prepare_command(self.data_dir, self.meta.get("source"))
            raise DataError(f"{self.data_dir}/{split}.bin holds token id {int(rows.max())}, not below vocab_size="
                            f"{self.vocab_size} (meta.json): the file is damaged or was not written for this "
                            f"tokenizer. Prepare the data again: {cmd}")
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.to(device), y.to(device)
