"""Faults, each reproduced for real: a user's mistake ends in one line on stderr (exit code 2, no
traceback) before any expensive work, and an interrupted job (SIGKILL, Ctrl-C, a full disk) leaves
the previous output intact, never a mixture.

Sections: data (prepare_owt.py, data.TokenData), export (export_hf.py), eval (eval_ppl.py),
sample (sample.py), train (train.py)."""
import errno
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import corpus
import data
import eval_ppl
import export_hf
import prepare_owt
import sample
import storage
import train
from conftest import ROOT, VOCAB, kron_run, run, run_argv, scratch, sha, tmpfs
from checkpoints import from_checkpoint, load_checkpoint, save_checkpoint
from conftest import gpt
from model import GPT

ENV = dict(os.environ)
WORDS = ["alpha", "beta", "gamma", "delta", "kronecker", "matrix", "sum", "product", "factor", "token",
         "the", "of", "and", "über", "東京"]


def write_corpus(path, paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of random words separated by blank lines (one document each for prepare)."""
    rng = np.random.default_rng(seed)
    paras = [" ".join(rng.choice(WORDS, size=rng.integers(20, 80))) for _ in range(paragraphs)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return str(path)


def snapshot(out) -> dict:
    return {n: sha(os.path.join(out, n)) for n in ("train.bin", "val.bin", "meta.json")}


def leftovers(directory) -> list[str]:
    """What failed or killed writes left: temp files/directories and `datasets` caches."""
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, n) for n in dirs + files
                  if n.startswith(storage.TEMP_PREFIX) or n == data.LOCAL_CACHE or n.endswith(".tmp")]
    return found


def cli(script, *args, **popen):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_clis(commands: list[tuple]) -> list[subprocess.CompletedProcess]:
    """Run several CLI invocations at once (each pays Python's and torch's start-up)."""
    procs = [cli(*c) for c in commands]
    done = []
    for c, p in zip(commands, procs):
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


def assert_one_line_error(proc, *needles, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), (proc.args, proc.stderr)
    for n in needles:
        assert n in lines[0], (proc.args, n, lines[0])


def wait_until(condition, proc, timeout=60.0) -> bool:
    """Poll condition() until true (True) or until proc exits first (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.001)
    raise TimeoutError("the moment never came")


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# =============================================================================
# data: prepare_owt.py and TokenData

@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    return {"old": write_corpus(d / "old.txt", 300, seed=1), "new": write_corpus(d / "new.txt", 6000, seed=2)}


def temp_dirs(parent, base="out"):
    return {n for n in os.listdir(parent) if n.startswith(f"{storage.TEMP_PREFIX}{base}.")}


@pytest.mark.slow
def test_killed_overwrite_leaves_the_old_output_or_the_new_one(tmp_path, corpora, tiktoken_gpt2):
    out = str(tmp_path / "out")
    corpus.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)

    def in_temp(name):
        return lambda: any(os.path.exists(os.path.join(tmp_path, t, name)) for t in temp_dirs(tmp_path) - stale)

    killed = []
    for moment in ("meta.json", "temp dir", "train.bin"):
        stale = temp_dirs(tmp_path)             # what earlier kills left; the new run removes it
        proc = cli("prepare_owt.py", "--dataset", corpora["new"], "--out", out, "--overwrite", "--num_proc", "1")
        cond = (lambda: bool(temp_dirs(tmp_path) - stale)) if moment == "temp dir" else in_temp(moment)
        if wait_until(cond, proc):
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            killed.append(moment)
        restored = not os.path.exists(out)
        if restored:            # killed between the swap's two renames: the next run restores the old output
            assert corpus.prepare(corpora["new"], out)["source"] == corpora["old"]
        # the old output whole, or (killed after the swap) the new one whole: never a mixture
        names = set(os.listdir(out)) - {data.LOCK_NAME, data.VERIFIED_NAME}
        assert names == {"train.bin", "val.bin", "meta.json"}, (moment, names)
        if snapshot(out) != old:                   # the kill came after the swap, or the run finished
            meta = data.TokenData(out).meta         # checks sizes and checksums against meta.json
            assert meta["source"] == corpora["new"]
            corpus.prepare(corpora["old"], out, val_fraction=0.1, overwrite=True)
            assert snapshot(out) == old             # the same input gives the same files
        else:
            assert data.TokenData(out).meta["source"] == corpora["old"]
            assert proc.returncode != -signal.SIGKILL or restored or temp_dirs(tmp_path), "the killed run's temp dir"
    assert killed[-2:] == ["temp dir", "train.bin"], killed
    # the next run removes what the kills left, and leaves a finished output alone
    assert corpus.prepare(corpora["new"], out)["source"] == corpora["old"]
    assert not leftovers(tmp_path) and snapshot(out) == old


@pytest.mark.slow
def test_ctrl_c_during_overwrite_keeps_the_old_output(tmp_path, corpora, tiktoken_gpt2):
    out = str(tmp_path / "out")
    corpus.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    proc = cli("prepare_owt.py", "--dataset", corpora["new"], "--out", out, "--overwrite", "--num_proc", "1")
    assert wait_until(lambda: any(os.path.exists(os.path.join(tmp_path, t, "train.bin"))
                                  for t in temp_dirs(tmp_path)), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted: {out} is as it was before this run"
    assert snapshot(out) == old and not leftovers(tmp_path)    # Ctrl-C cleans up its temp directory itself


def test_kill_between_the_two_renames_is_repaired(tmp_path, corpora, tiktoken_gpt2, capsys):
    """storage.atomic_directory swaps with two renames; a kill between them leaves no --out, the old
    output under a temp name and the new one under another. The next run restores the old one."""
    out = str(tmp_path / "out")
    corpus.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    moved = tmp_path / f"{storage.TEMP_PREFIX}out.old.k1ll3d00"
    os.replace(out, moved)
    shutil.copytree(moved, tmp_path / f"{storage.TEMP_PREFIX}out.n3wd1r00")       # the new one, complete
    capsys.readouterr()
    assert corpus.prepare(corpora["new"], out)["source"] == corpora["old"]
    assert "restored" in capsys.readouterr().out
    assert snapshot(out) == old and not leftovers(tmp_path)


@pytest.mark.slow
def test_second_prepare_waits_for_the_first(tmp_path, corpora, tiktoken_gpt2):
    """Runs of a sweep that share a data_dir: the second waits, then finds the output finished."""
    out = tmp_path / "out"
    with data.output_lock(str(out)):              # the first run, in the middle of its work
        proc = cli("prepare_owt.py", "--dataset", corpora["old"], "--out", out, "--num_proc", "1")
        assert select.select([proc.stdout], [], [], 60)[0], "the second run said nothing"
        assert "is being prepared by another process; waiting" in proc.stdout.readline()
        time.sleep(0.2)
        assert proc.poll() is None                 # still waiting
        # the first run ends with atomic_directory's swap: the waiting run then locks the new directory
        data.write_token_files(str(tmp_path / "ready"), {"train": np.arange(100), "val": np.arange(10)})
        os.replace(out, tmp_path / "swapped-out")
        os.replace(tmp_path / "ready", out)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "already holds a finished dataset" in stdout
    assert data.TokenData(str(out)).meta["source"] == "write_token_files"


def test_mixed_runs_are_refused(tmp_path, corpora, tiktoken_gpt2):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    corpus.prepare(corpora["old"], a, val_fraction=0.1)
    corpus.prepare(corpora["old"], b, val_fraction=0.1, seed=7)      # another split of the same text
    assert os.path.getsize(os.path.join(a, "train.bin")) != os.path.getsize(os.path.join(b, "train.bin"))
    shutil.copy(os.path.join(b, "train.bin"), os.path.join(a, "train.bin"))
    with pytest.raises(data.DataError, match=r"train\.bin holds .* bytes but meta\.json records .*"
                                             r"python prepare_owt\.py --dataset .*old\.txt --out .*a --overwrite"):
        data.TokenData(a)
    # same size, other tokens: only the checksum tells
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    data.write_token_files(c, {"train": np.arange(5000) % 50257, "val": np.arange(100)})
    data.write_token_files(d, {"train": np.arange(5000)[::-1] % 50257, "val": np.arange(100)})
    shutil.copy(os.path.join(d, "train.bin"), os.path.join(c, "train.bin"))
    with pytest.raises(data.DataError, match=r"train\.bin is not the file meta\.json was written with .*"
                                             r"prepare_owt\.py .*--out .*c --overwrite"):
        data.TokenData(c)
    assert data.finished(c) is None        # and prepare does not take it for a finished output


def test_random_bytes_as_train_bin(tmp_path):
    d = str(tmp_path / "d")
    data.write_token_files(d, {"train": np.arange(20000) % 1000, "val": np.arange(300)})
    path = os.path.join(d, "train.bin")
    junk = np.random.default_rng(0).bytes(os.path.getsize(path))
    with open(path, "wb") as f:
        f.write(junk)
    with pytest.raises(data.DataError, match="checksum of its first"):
        data.TokenData(d)
    # a meta.json without checksums (an older prepare_owt.py): the size agrees, so it is refused until
    # the checksums are recorded, which the random ids do not pass
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    del meta["header_sha256"], meta["sha256"]
    storage.write_json(meta, meta_path)
    with pytest.raises(data.DataError, match=r"records no checksum of the whole token files"):
        data.TokenData(d)
    with pytest.raises(data.DataError, match=r"train\.bin holds token id \d+, not below vocab_size=50257"):
        data.record_checksums(d)
    # bytes that change under a running reader: the batch check stops them before an embedding
    d = str(tmp_path / "e")
    data.write_token_files(d, {"train": np.arange(20000) % 1000, "val": np.arange(300)})
    td = data.TokenData(d)
    with open(path := os.path.join(d, "train.bin"), "r+b") as f:
        f.write(junk[:os.path.getsize(path)])
    offsets = td.sample_offsets("train", 64, (8,), torch.Generator().manual_seed(0))
    with pytest.raises(data.DataError, match=r"train\.bin holds token id \d+, not below vocab_size=50257"):
        td.batch("train", offsets, 64)
    x, y = td.batch("val", torch.tensor([0, 10]), 64)                 # the intact split still reads
    assert torch.equal(x[0], torch.arange(64)) and torch.equal(y[1], torch.arange(11, 75))


def test_token_data_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_owt.py"):
        data.TokenData(str(tmp_path / "missing"))
    d = tmp_path / "bare"
    d.mkdir()
    for split in data.SPLITS:                        # bins without meta.json: nothing to check them against
        np.arange(100, dtype=np.uint16).tofile(d / f"{split}.bin")
    with pytest.raises(data.DataError, match=r"no meta\.json.*python prepare_owt\.py --out .*bare --overwrite"):
        data.TokenData(str(d))
    (d / "meta.json").write_text("{not json")
    with pytest.raises(data.DataError, match="not a valid meta.json"):
        data.TokenData(str(d))
    ok = str(tmp_path / "ok")
    data.write_token_files(ok, {"train": np.arange(100), "val": np.arange(50)}, vocab_size=128)
    td = data.TokenData(ok)
    td.check_vocab(128)
    with pytest.raises(data.DataError, match="vocab_size=128 .* more than the model's 100"):
        td.check_vocab(100)
    td.check_block_size(48)
    with pytest.raises(data.DataError, match=r"val\.bin holds 50 tokens, fewer than block_size \+ 2 = 51"):
        td.check_block_size(49)
    with pytest.raises(data.DataError, match=r"outside \[0, vocab_size=128\)"):
        data.write_token_files(str(tmp_path / "bad"), {"train": np.array([1, 128]), "val": np.array([1, 2])},
                               vocab_size=128)
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty (0 bytes)"),
    ("blank.txt", b"  \n\n\t \n \n", "holds only whitespace"),
    ("latin1.txt", "First paragraph.\n\nCaf\u00e9 au lait.\n".encode("latin-1"),
     "is not UTF-8 text (byte 0xe9 at offset 21"),
    ("empty.jsonl", b"", "is empty (0 bytes)"),
])
def test_bad_input_files_are_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare_owt.main(["--dataset", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {src} {message}"), err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.slow
def test_bad_file_among_good_ones_and_the_cli_process(tmp_path, corpora, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(corpora["old"], folder / "a.txt")
    (folder / "b.txt").write_bytes(b"\xff\xfe h\x00i\x00")          # UTF-16, a common surprise
    out = tmp_path / "out"
    proc = run_clis([("prepare_owt.py", "--dataset", folder, "--out", out)])[0]
    assert_one_line_error(proc, f"{folder / 'b.txt'} is not UTF-8 text (byte 0xff at offset 0)")
    for argv, message in ((["--num_proc", "0"], "--num_proc must be an integer >= 1, got 0"),
                          (["--out", corpora["old"]], f"--out {corpora['old']} is a file")):
        with pytest.raises(SystemExit) as e:
            prepare_owt.main(["--dataset", corpora["old"], "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=0.0), r"--val_fraction must be in \(0, 1\), got 0.0"),
    (dict(val_fraction=1.0), r"--val_fraction must be in \(0, 1\), got 1.0"),
    (dict(val_fraction=math.nan), r"--val_fraction must be in \(0, 1\), got nan"),
    (dict(num_proc=0), "--num_proc must be an integer >= 1, got 0"),
    (dict(txt_docs="page"), "--txt_docs must be one of"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, corpora, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match=message):
        corpus.prepare(corpora["old"], str(out), **kwargs)
    assert not out.exists()


def test_output_directory_rules(tmp_path, corpora, tiktoken_gpt2):
    # train.py downloads a missing source into data_dir and prepares data_dir from it: the swap keeps it
    out = tmp_path / "data"
    out.mkdir()
    shutil.copy(corpora["old"], out / "copy.txt")
    corpus.prepare(str(out / "copy.txt"), str(out), val_fraction=0.1)
    corpus.prepare(str(out / "copy.txt"), str(out), val_fraction=0.2, overwrite=True)
    assert sha(out / "copy.txt") == sha(corpora["old"])
    assert data.TokenData(str(out)).meta["val_fraction"] == 0.2
    assert sorted(os.listdir(out)) == [data.VERIFIED_NAME, "copy.txt", "meta.json", "train.bin", "val.bin"]
    # a directory with sub-directories is not replaced whole
    (out / "notes").mkdir()
    with pytest.raises(data.DataError, match="holds notes, which no prepared dataset has"):
        corpus.prepare(corpora["old"], str(out), overwrite=True)
    # a symlinked output stays a link to where the data lives
    real = tmp_path / "bigdisk" / "data"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    corpus.prepare(corpora["old"], str(tmp_path / "link"), val_fraction=0.1)
    assert (tmp_path / "link").is_symlink() and (real / "meta.json").is_file()


def meta_on_a_full_disk(obj, path):
    """write_json whose write runs out of space half-way (the last write of a run)."""
    def write(f):
        f.write(b'{"partial": ')
        full_disk()
    storage.atomic_write(path, write)


@pytest.mark.parametrize("where", ["train.bin", "meta.json"])
def test_disk_full_while_preparing(tmp_path, corpora, tiktoken_gpt2, monkeypatch, capsys, where):
    out = str(tmp_path / "out")
    corpus.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    if where == "train.bin":        # the space for a bin is reserved before it is written
        monkeypatch.setattr(os, "posix_fallocate", full_disk)
    else:
        monkeypatch.setattr(corpus, "write_json", meta_on_a_full_disk)
    with pytest.raises(storage.DiskFull, match=f"no space left on the device while writing {out}"):
        corpus.prepare(corpora["old"], out, val_fraction=0.2, overwrite=True)
    assert snapshot(out) == old and not leftovers(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare_owt.main(["--dataset", corpora["old"], "--out", out, "--overwrite"])
    err = capsys.readouterr().err                  # the progress bars, then one line
    assert e.value.code == 1 and "Traceback" not in err        # the machine's fault, not a mistake
    assert err.strip().splitlines()[-1].startswith(f"error: no space left on the device while writing {out}")
    assert snapshot(out) == old and not leftovers(tmp_path)


def test_download(tmp_path, monkeypatch):
    src = tmp_path / "remote.txt"
    src.write_text("some text\n" * 1000)
    dest = tmp_path / "local" / "copy.txt"
    with pytest.raises(data.DataError, match=r"could not download file://.*missing\.txt .*put the file at"):
        corpus.download((tmp_path / "missing.txt").as_uri(), str(dest), log=lambda m: None)
    assert not dest.exists()
    # interrupted half-way: no partial file where the next run would take it for the whole one

    def half_then_ctrl_c(fsrc, fdst, length=0):
        fdst.write(fsrc.read(100))
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "copyfileobj", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        corpus.download(src.as_uri(), str(dest), log=lambda m: None)
    assert not dest.exists() and not leftovers(tmp_path)
    monkeypatch.undo()
    assert corpus.download(src.as_uri(), str(dest), log=lambda m: None) == str(dest)
    assert sha(dest) == sha(src) and not leftovers(tmp_path)


# =============================================================================
# export: export_hf.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_hf_dir):
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_checkpoint(GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8)), path)
    return path


@pytest.mark.slow
def test_export_out_rules(tmp_path, tiny_ckpt, monkeypatch):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "generation_config.json").write_text("{}")      # left by another tool: not an export of ours
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    procs = run_clis([("export_hf.py", "--model", tiny_ckpt, "--out", out, "--overwrite"),
                      ("export_hf.py", "--model", tiny_ckpt, "--out", a_file)])
    assert_one_line_error(procs[0], f"--out {out} is not empty and is not an earlier export")
    assert_one_line_error(procs[1], f"--out {a_file} is a file")
    assert os.listdir(out) == ["generation_config.json"] and a_file.read_text() == "keep me"

    out = tmp_path / "export"
    export_hf.main(["--model", tiny_ckpt, "--out", str(out)])
    export_hf.main(["--model", tiny_ckpt, "--out", str(out), "--overwrite"])    # an earlier export: replaced
    marker = json.load(open(out / export_hf.MARKER))
    assert sorted(os.listdir(out)) == sorted(marker["files"] + [export_hf.MARKER])
    first = snapshot_dir(out)
    transformers.GPT2LMHeadModel.from_pretrained(str(out))
    # a full disk in the middle of an --overwrite: the previous export stays whole
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(storage.DiskFull, match="no space left"):
        export_hf.main(["--model", tiny_ckpt, "--out", str(out), "--overwrite"])
    monkeypatch.undo()
    assert snapshot_dir(out) == first and not leftovers(tmp_path)


def snapshot_dir(d) -> dict:
    return {n: sha(os.path.join(d, n)) for n in sorted(os.listdir(d))}


# =============================================================================
# eval: eval_ppl.py

def check_cli_mistakes(script: str, main, cases: list[tuple]) -> None:
    """Each (arguments, message, as_process) case: main() raises one line holding the message; those
    marked as_process also run as the script: exit 2, that one line on stderr, nothing on stdout."""
    for args, message, _ in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            main([str(a) for a in args])
        assert message in str(e.value) and "\n" not in str(e.value)
    procs = run_clis([(script, *args) for args, _, as_process in cases if as_process])
    for proc, message in zip(procs, [m for _, m, as_process in cases if as_process]):
        assert_one_line_error(proc, message)
        assert proc.stdout == ""


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    write_corpus(path, 8, seed=3)
    return str(path)


@pytest.mark.slow
def test_eval_cli_mistakes(tmp_path, tiny_hf_dir, small_text):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9\n".encode("latin-1"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ("--model", tiny_hf_dir, "--data_file", small_text, "--device", "cpu")
    cases = [      # (arguments, the error, whether to run it as a process too)
        (base + ("--protocol", "sliding", "--stride", "0"), "--stride 0: must be >= 1", True),
        (base + ("--protocol", "sliding", "--stride", "-5"), "--stride -5: must be >= 1", False),
        (base + ("--stride", "16"), "--stride applies to --protocol sliding only", False),
        (base + ("--protocol", "sliding", "--block_size", "32", "--stride", "32"), "--stride 32 must be below", False),
        (base + ("--block_size", "1"), "--block_size 1: must be >= 2", False),
        (base + ("--batch_size", "0"), "--batch_size 0: must be >= 1", False),
        (base + ("--limit_tokens", "1"), "--limit_tokens 1: must be >= 2", False),
        (base + ("--out", a_file / "results.json"), f"--out {a_file / 'results.json'}: cannot write in {a_file}", True),
        (base + ("--out", tmp_path), f"--out {tmp_path} is a directory", False),
        # the typo is the second model: it fails before the first one or any dataset is loaded
        (("--model", tiny_hf_dir, "--model", tmp_path / "typo.pt", "--datasets", "wikitext-2"),
         f"no such directory or checkpoint: '{tmp_path / 'typo.pt'}'", True),
        (("--model", tiny_hf_dir, "--data_file", latin1, "--device", "cpu"),
         f"--data_file {latin1} is not UTF-8 text (byte 0xe9 at offset 3)", True),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ("--device", "cuda"), "torch sees no CUDA GPU", False))
    check_cli_mistakes("eval_ppl.py", eval_ppl.main, cases)      # nothing evaluated: no table on stdout
    assert not leftovers(tmp_path)


def test_eval_dtype_paper_is_float32(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # a bf16 GPU, for the choice only
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert eval_ppl.eval_dtype("auto", "paper", cuda) == torch.float32
    assert eval_ppl.eval_dtype("auto", "sliding", cuda) == torch.bfloat16
    assert eval_ppl.eval_dtype("bfloat16", "paper", cuda) == torch.bfloat16     # --dtype says otherwise
    assert eval_ppl.eval_dtype("auto", "sliding", cpu) == torch.float32
    with pytest.raises(SystemExit):
        eval_ppl.parse_args(["--help"])
    assert "auto = float32 for --protocol paper" in " ".join(capsys.readouterr().out.split())


def test_eval_out_is_written_atomically(tmp_path, tiny_hf_dir, small_text, monkeypatch, tiktoken_gpt2):
    out = tmp_path / "res" / "results.json"
    argv = ["--model", tiny_hf_dir, "--data_file", small_text, "--device", "cpu", "--block_size", "32",
            "--out", str(out)]
    records = eval_ppl.main(argv)
    assert json.loads(out.read_text()) == records and records[0]["dtype"] == "float32"
    before = sha(out)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(storage.DiskFull, match=f"no space left on the device while writing {out}"):
        eval_ppl.main(argv + ["--protocol", "sliding"])
    monkeypatch.undo()
    assert sha(out) == before and os.listdir(out.parent) == ["results.json"]


# =============================================================================
# sample: sample.py

@pytest.mark.slow
def test_sample_cli_mistakes(tmp_path, tiny_hf_dir):
    base = ("--model", tiny_hf_dir, "--device", "cpu")
    cases = [      # (arguments, the error, whether to run it as a process too)
        (base + ("--num_samples", "0"), "--num_samples 0: must be >= 1", True),
        (base + ("--max_new_tokens", "-5"), "--max_new_tokens -5: must be >= 1", True),
        (base + ("--top_k", "0"), "--top_k 0: must be >= 1", True),
        (base + ("--prompt_file", tmp_path / "none.txt"), f"--prompt_file {tmp_path / 'none.txt'}: no such file", True),
        (base + ("--top_p", "1.5"), "--top_p 1.5: must be in (0, 1]", False),
        (base + ("--temperature", "-1"), "--temperature -1.0: must be a finite number >= 0", False),
        (("--model", tmp_path / "none.pt"), "no such directory or checkpoint", False),
    ]
    check_cli_mistakes("sample.py", sample.main, cases)


# =============================================================================
# train: train.py
#
# A kill has to land inside a checkpoint write, which a tiny model finishes in a millisecond. So the
# killed processes run PAUSING_TRAIN (written to a temp file by the fixture pausing_train): train.py
# run as `python train.py` runs it, except that one chosen call of storage.atomic_write (every
# checkpoint and run.json goes through it) puts half of its bytes in its temp file, flushes them,
# tells the test and waits to be killed.

PAUSING_TRAIN = '''\
"""python pausing_train.py REPO [train.py arguments]: train.py with one atomic write stopped half-way.

PAUSE_WRITE=NAME:N picks the N-th write of the out_dir file NAME (ckpt_best.pt, ckpt_last.pt, run.json):
half of its bytes go to its temp file, which is flushed; then the file PAUSED is created and the write
waits to be killed. FULL_DISK=NAME:N makes that write fail there with ENOSPC instead, as a full disk does."""
import errno, io, os, runpy, sys, time

sys.argv = [os.path.join(sys.argv[1], "train.py"), *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import storage

real_atomic_write, counts = storage.atomic_write, {}


def atomic_write(path, write):
    name = os.path.basename(path)
    counts[name] = counts.get(name, 0) + 1
    moment = f"{name}:{counts[name]}"
    if moment not in (os.environ.get("PAUSE_WRITE"), os.environ.get("FULL_DISK")):
        return real_atomic_write(path, write)

    def half_then_stop(f):
        buf = io.BytesIO()
        write(buf)
        f.write(buf.getvalue()[:buf.tell() // 2])
        f.flush()
        if moment == os.environ.get("FULL_DISK"):
            raise OSError(errno.ENOSPC, "No space left on device")
        open(os.environ["PAUSED"], "w").close()
        time.sleep(120)
        raise RuntimeError("pausing_train.py: nobody killed this process")
    return real_atomic_write(path, half_then_stop)


storage.atomic_write = atomic_write
runpy.run_path(sys.argv[0], run_name="__main__")
'''
CHECKPOINTS = ("ckpt_best.pt", "ckpt_last.pt")


@pytest.fixture(scope="module")
def pausing_train(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "pausing_train.py"
    path.write_text(PAUSING_TRAIN)
    return str(path)


def train_process(script, args, **env) -> subprocess.Popen:
    """`python SCRIPT ... train.py arguments`, one thread (as the in-process runs: equal numbers),
    unbuffered (a killed process's output is not lost)."""
    script_args = [script, ROOT] if script != "train.py" else [os.path.join(ROOT, "train.py")]
    return subprocess.Popen([sys.executable, *script_args, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env})


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def checkpoint_files(out) -> dict:
    """{name: sha256} of every file in out_dir but the lock (checkpoints, run.json, temp files)."""
    return {n: sha(os.path.join(out, n)) for n in sorted(os.listdir(out)) if n != storage.RunLock.NAME}


def interrupt_after_save(monkeypatch, n):
    """Ctrl-C right after the n-th ckpt_last.pt is written (the last file of an evaluation): an
    unfinished run."""
    real, count = storage.atomic_write, [0]

    def write_then_interrupt(path, write):
        real(path, write)
        count[0] += os.path.basename(path) == "ckpt_last.pt"
        if count[0] == n:
            raise KeyboardInterrupt
    monkeypatch.setattr(storage, "atomic_write", write_then_interrupt)


def evals(ckpt) -> list[tuple]:
    return [(h["iter"], h["train"], h["val"]) for h in ckpt["history"]]


def test_another_run_in_the_out_dir_is_refused_the_same_one_resumes(tmp_path, data_dir, monkeypatch, capsys):
    out, kw = tmp_path / "run", scratch(max_iters=6, eval_interval=2)
    ref = run(data_dir, tmp_path / "ref", **kw)
    interrupt_after_save(monkeypatch, 2)                          # at iteration 4
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, out, **kw)
    monkeypatch.undo()
    files = checkpoint_files(out)
    assert sorted(files) == [*CHECKPOINTS, "loss.png"]                # loss.png of iteration 2
    # a new run of another config in that out_dir: refused, naming the run, what differs and the ways out
    with pytest.raises(train.TrainError) as e:
        run(data_dir, out, **{**kw, "learning_rate": 1e-3, "batch_size": 2})
    message = str(e.value)
    for needle in (f"{out} holds another run (init_from='scratch', iteration 4 of 6, best val loss",
                   "learning_rate: 0.003 -> 0.001", "batch_size: 4 -> 2", "--init_from=resume",
                   "another --out_dir", "--overwrite=True"):
        assert needle in message, (needle, message)
    assert "\n" not in message and checkpoint_files(out) == files
    # the same command resumes, exactly where it stopped; in a run directory moved elsewhere too
    moved = tmp_path / "moved"
    os.rename(out, moved)
    capsys.readouterr()
    resumed = run(data_dir, moved, **kw)
    assert f"{moved} holds this run at iteration 4: resuming it" in capsys.readouterr().out
    assert resumed["iters"] == [5, 6] and resumed["losses"] == ref["losses"][4:]
    out = moved
    # --overwrite=True starts over, with the new config
    new = run(data_dir, out, **{**kw, "learning_rate": 1e-3, "overwrite": True})
    assert new["iters"] == list(range(1, 7)) and new["losses"][0] == ref["losses"][0]
    assert new["losses"][1] != ref["losses"][1]                  # the other learning rate from step 2 on
    last = load_checkpoint(str(out / "ckpt_last.pt"))
    assert last["config"]["learning_rate"] == 1e-3 and evals(last)[0][0] == 2 and len(evals(last)) == 3


def test_resume_of_a_run_initialised_from_hugging_face(tmp_path, data_dir, hf_dir, monkeypatch, capsys):
    # the HF model fixes n_layer, n_head, n_embd (2, 2, 32): the config's values are ignored (and stored as given)
    out, kw = tmp_path / "run", dict(max_iters=6, eval_interval=2, n_layer=4, n_head=4, n_embd=64)
    ref = kron_run(data_dir, hf_dir, tmp_path / "ref", **kw)
    assert "fixes n_embd, n_head, n_layer; the config's values are ignored" in capsys.readouterr().out
    assert ref["model"].config.n_layer == 2
    interrupt_after_save(monkeypatch, 1)                          # at iteration 2
    with pytest.raises(KeyboardInterrupt):
        kron_run(data_dir, hf_dir, out, **kw)
    monkeypatch.undo()
    interrupt_after_save(monkeypatch, 1)                          # the same command resumes; at iteration 4
    with pytest.raises(KeyboardInterrupt):
        kron_run(data_dir, hf_dir, out, **kw)
    assert load_checkpoint(str(out / "ckpt_last.pt"))["iter_num"] == 4
    monkeypatch.undo()
    capsys.readouterr()
    resumed = kron_run(data_dir, hf_dir, out, **{**kw, "init_from": "resume"})     # and so does init_from=resume
    assert "resuming at iteration 4" in capsys.readouterr().out
    assert resumed["iters"] == [5, 6] and resumed["losses"] == ref["losses"][4:]
    last, ref_last = (load_checkpoint(str(d / "ckpt_last.pt")) for d in (out, tmp_path / "ref"))
    assert evals(last) == evals(ref_last) and last["config"]["n_layer"] == 4
    for k, v in ref_last["model"].items():
        assert torch.equal(last["model"][k], v), k


def assert_checkpoints_consistent(out, last_iter, best_iter):
    """Both loadable (ckpt_last.pt may not exist yet), ckpt_best.pt never older than what
    ckpt_last.pt records as the best, both of mode 0644."""
    best = load_checkpoint(os.path.join(out, "ckpt_best.pt"))
    assert best["iter_num"] == best_iter
    assert best["val_loss"] == best["best_val_loss"]
    if last_iter is None:
        assert not os.path.exists(os.path.join(out, "ckpt_last.pt"))
    else:
        last = load_checkpoint(os.path.join(out, "ckpt_last.pt"))
        from_checkpoint(os.path.join(out, "ckpt_last.pt"))
        assert last["iter_num"] == last_iter
        assert best["val_loss"] == last["best_val_loss"] or best["iter_num"] > last["iter_num"]
        assert best["val_loss"] <= last["best_val_loss"]
    for name in CHECKPOINTS:
        if os.path.exists(os.path.join(out, name)):
            assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name


def temp_files(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith(storage.TEMP_PREFIX))


@pytest.mark.slow
def test_kills_during_checkpoint_writes_leave_a_run_that_resumes_exactly(tmp_path, data_dir, pausing_train,
                                                                        capsys):
    out = tmp_path / "run"
    args = run_argv(data_dir, out, **scratch(max_iters=10, eval_interval=2))
    paused = tmp_path / "paused"

    def stop_in(write, sig=signal.SIGKILL, meanwhile=lambda: None) -> subprocess.CompletedProcess:
        """Run the same command until it is half-way through `write`, then send `sig`."""
        if paused.exists():
            paused.unlink()
        proc = train_process(pausing_train, args, PAUSE_WRITE=write, PAUSED=str(paused))
        meanwhile()
        assert wait_until(paused.exists, proc), finish(proc)
        name = write.split(":")[0]
        temp = [n for n in temp_files(out) if n.startswith(f"{storage.TEMP_PREFIX}{name}.")]
        assert len(temp) == 1 and os.path.getsize(out / temp[0]) > 0      # a half-written checkpoint
        proc.send_signal(sig)
        return finish(proc)

    reference = {}
    # 1. killed while ckpt_last.pt is written for the first time: only ckpt_best.pt exists (iteration 2)
    stop_in("ckpt_last.pt:1", meanwhile=lambda: reference.update(train.main(  # the uninterrupted run
        run_argv(data_dir, tmp_path / "ref", **scratch(max_iters=10, eval_interval=2)))))
    ref_val = [e["val"] for e in reference["evals"]]
    assert ref_val == sorted(ref_val, reverse=True), "every evaluation must improve for these moments"
    assert_checkpoints_consistent(out, None, 2)
    left = temp_files(out)
    # 2. the same command resumes from ckpt_best.pt (it holds the whole state); killed while it writes
    # ckpt_last.pt for the second time: ckpt_best.pt of iteration 6 is renamed, ckpt_last.pt is of 4
    proc = stop_in("ckpt_last.pt:2")
    assert "removed 1 temp file(s) a killed run left" in proc.stdout and "resuming at iteration 2" in proc.stdout
    assert not set(left) & set(temp_files(out))
    assert_checkpoints_consistent(out, 4, 6)
    # 3. the same command resumes from the newer one, ckpt_best.pt of iteration 6; Ctrl-C in the middle
    # of writing ckpt_best.pt at 8: one line, the temp file removed, the checkpoints as they were
    best = sha(out / "ckpt_best.pt")
    proc = stop_in("ckpt_best.pt:1", signal.SIGINT)
    assert "resuming at iteration 6" in proc.stdout
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["interrupted; the checkpoints are intact: run the same command "
                                                "to resume"]
    assert temp_files(out) == [] and sha(out / "ckpt_best.pt") == best
    assert_checkpoints_consistent(out, 4, 6)
    # the same command, uninterrupted: it finishes with what an uninterrupted run computes
    capsys.readouterr()
    resumed = train.main(args)
    assert "resuming at iteration 6" in capsys.readouterr().out
    assert resumed["iters"] == list(range(7, 11)) and resumed["losses"] == reference["losses"][6:]
    assert_checkpoints_consistent(out, 10, 10)
    last, ref = (load_checkpoint(str(d / "ckpt_last.pt")) for d in (out, tmp_path / "ref"))
    assert evals(last) == evals(ref) and [h["iter"] for h in last["history"]] == [2, 4, 6, 8, 10]
    for k, v in ref["model"].items():
        assert torch.equal(last["model"][k], v), k
    for a, b in zip(last["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert temp_files(out) == []


@pytest.mark.slow
def test_second_run_in_one_out_dir_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path, data_dir,
                                                                                pausing_train):
    out, paused = tmp_path / "run", tmp_path / "paused"
    args = run_argv(data_dir, out, **scratch(max_iters=4, eval_interval=2))
    first = train_process(pausing_train, args, PAUSE_WRITE="ckpt_last.pt:1", PAUSED=str(paused))
    lock = out / storage.RunLock.NAME
    assert wait_until(lambda: lock.exists() and lock.read_text().startswith(f"pid {first.pid} "), first)
    second = finish(train_process("train.py", args))
    assert_one_line_error(second, f"{out} is in use by a running process (pid {first.pid} on ", code=1)
    assert second.stdout == ""                                  # refused before any work
    assert wait_until(paused.exists, first) and first.poll() is None
    first.send_signal(signal.SIGKILL)                           # its lock is left behind, stale
    finish(first)
    assert lock.read_text().startswith(f"pid {first.pid} ")
    res = train.main(args)                                      # the same command takes the lock over
    assert res["iters"] == [3, 4] and lock.read_text().startswith(f"pid {os.getpid()} ")
    assert_checkpoints_consistent(out, 4, 4)


@pytest.mark.parametrize("where, nth", [("ckpt_best.pt", 2), ("ckpt_last.pt", 2), ("run.json", 1)])
def test_disk_full_while_saving(tmp_path, data_dir, monkeypatch, capsys, where, nth):
    out, kw = tmp_path / "run", scratch(max_iters=6, eval_interval=2)
    real, counts, before = storage.atomic_write, {}, {}

    def atomic_write(path, write):
        name = os.path.basename(path)
        counts[name] = counts.get(name, 0) + 1
        if (name, counts[name]) != (where, nth):
            return real(path, write)
        before.update(checkpoint_files(out))

        def half_then_full(f):
            f.write(b"\0" * 1000)
            full_disk()
        return real(path, half_then_full)
    monkeypatch.setattr(storage, "atomic_write", atomic_write)
    with pytest.raises(storage.DiskFull, match=re.escape(f"no space left on the device while writing {out / where}; "
                                                         "the previous version (if any) is intact")) as e:
        run(data_dir, out, **kw)
    assert "\n" not in str(e.value)
    assert before and checkpoint_files(out) == before and not leftovers(tmp_path)
    monkeypatch.setattr(storage, "atomic_write", real)
    capsys.readouterr()
    res = run(data_dir, out, **kw)                               # the same command, with space again
    if where == "run.json":                                      # the last thing a run writes
        assert res["iters"] == [] and "is finished" in capsys.readouterr().out
        assert (out / "run.json").exists()
    elif where == "ckpt_last.pt":                                # ckpt_best.pt of iteration 4 is newer
        assert res["iters"] == [5, 6]
    else:
        assert res["iters"] == [3, 4, 5, 6]
    assert_checkpoints_consistent(out, 6, 6)


@pytest.fixture
def small_disk(tmp_path):
    """(directory, resize(bytes)): a tmpfs of its own, to fill for real. Needs root and a mount that
    works (skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        yield disk, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def test_a_disk_that_really_fills_up(tmp_path, data_dir, small_disk):
    """A real ENOSPC, which torch.save reports as a RuntimeError of its own: still DiskFull, one line."""
    disk, resize = small_disk
    out, kw = disk / "run", scratch(max_iters=6, eval_interval=2)
    ref = run(data_dir, tmp_path / "ref", **kw)
    size = os.path.getsize(tmp_path / "ref" / "ckpt_last.pt")
    resize(5 * size // 2)                 # ckpt_best.pt and ckpt_last.pt of iteration 2, not a third checkpoint
    with pytest.raises(storage.DiskFull, match=re.escape(f"no space left on the device while writing "
                                                         f"{out / 'ckpt_best.pt'}; the previous version")):
        run(data_dir, out, **kw)
    assert sorted(os.listdir(out)) == [storage.RunLock.NAME, *CHECKPOINTS, "loss.png"]      # no temp file
    assert_checkpoints_consistent(out, 2, 2)
    resize(4 * size)                      # space again: the same command resumes
    res = run(data_dir, out, **kw)
    assert res["iters"] == [3, 4, 5, 6] and res["losses"] == ref["losses"][2:]
    assert_checkpoints_consistent(out, 6, 6)


@pytest.mark.slow
def test_train_cli_mistakes(tmp_path, data_dir, pausing_train):
    """Each mistake: ConfigError in-process, one line and exit code 2 from the CLI, before any work.
    Also through the CLI: a finished run (exit code 0, nothing done) and a full disk (one line)."""
    done = tmp_path / "done"                                     # a finished run
    run(data_dir, done, **scratch(max_iters=4, eval_interval=2))
    finished = checkpoint_files(done)
    for copy in ("done_copy", "done_copy2"):          # a copy of a run is the same run
        shutil.copytree(done, tmp_path / copy)
    weights_only = tmp_path / "weights_only"
    save_checkpoint(gpt(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32),
                    str(weights_only / "ckpt_last.pt"))
    junk = tmp_path / "junk"                                     # random bytes of the right size
    shutil.copytree(data_dir, junk)
    size = os.path.getsize(junk / "train.bin")
    (junk / "train.bin").write_bytes(np.random.default_rng(0).bytes(size))
    bad_config = tmp_path / "bad_config.py"
    bad_config.write_text("batch_size = 4\nlearning_rate = 1e-3 *\n")
    new = scratch(max_iters=4, eval_interval=2)

    def args(out="out", config=None, **kw):
        kw = {"data_dir": data_dir, **new, **kw}
        return ([str(config)] if config else []) + run_argv(kw.pop("data_dir"), tmp_path / out, **kw)

    cases = [      # (arguments, the error, whether to run it as a process too)
        (args(batch_size=0), "batch_size=0 must be at least 1", False),
        (args(gradient_accumulation_steps=0), "gradient_accumulation_steps=0 must be at least 1", False),
        (args(eval_interval=0), "eval_interval=0 must be at least 1", False),
        (args(log_interval=0), "log_interval=0 must be at least 1", False),
        (args(learning_rate=-1), "learning_rate=-1.0 must be > 0", False),
        (args(max_iters=-5), "max_iters=-5 must be >= 0", False),
        (args(device="gpu"), "device='gpu' is not a device; use auto, cpu", False),
        (args(learning_rat=1e-3), "unknown config key 'learning_rat' in the command line. Did you mean learning_rate",
         False),
        (args(mlp="kron", kron_shape=(4, 2, 2)), "kron_shape=(4, 2, 2) must be a pair of positive integers", False),
        (args(config=bad_config), f"config file {bad_config}, line 2: SyntaxError", True),
        (args(init_from=str(tmp_path / "no_such.pt")), f"no such directory or checkpoint: '{tmp_path / 'no_such.pt'}' (no such file or directory",
         False),
        # the data does not fit: found once the data is opened
        (args("out_data", block_size=1000), "fewer than block_size + 2 = 1002; use a smaller block_size", False),
        (args("out_data", data_dir=str(junk)), f"{junk}/train.bin is not the file meta.json was written with", True),
        (args("weights_only", init_from="resume"),
         f"{weights_only / 'ckpt_last.pt'} holds weights only (no optimizer state or iteration), so it cannot be "
         f"resumed; start a new run from it with --init_from={weights_only / 'ckpt_last.pt'}", False),
        (args("done_copy", init_from="resume", decay_factors=False),
         f"cannot resume {tmp_path / 'done_copy'} with another model configuration or optimizer structure "
         "(decay_factors: True -> False)", False),
    ]
    for argv, message, _ in cases:
        with pytest.raises(train.ConfigError) as e:
            train.main(argv)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path / "out_data") == [storage.RunLock.NAME]
    procs = [train_process("train.py", argv) for argv, _, as_process in cases if as_process]
    # the finished run: the same command says so and exits 0; a full disk: one line, exit code 1
    again = train_process("train.py", args("done_copy2"))
    disk = train_process(pausing_train, args("full"), FULL_DISK="ckpt_best.pt:1")
    for proc, message in zip(procs, [m for _, m, as_process in cases if as_process]):
        proc = finish(proc)
        assert_one_line_error(proc, message)
    again = finish(again)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert f"the run in {tmp_path / 'done_copy2'} is finished (iteration 4 of 4" in again.stdout
    assert "iter 1:" not in again.stdout
    assert all(sha(tmp_path / "done_copy2" / n) == finished[n] for n in CHECKPOINTS)
    assert_one_line_error(finish(disk), f"error: no space left on the device while writing "
                                        f"{tmp_path / 'full' / 'ckpt_best.pt'}; the previous version", code=1)
    assert not leftovers(tmp_path)
    assert checkpoint_files(tmp_path / "done_copy") == finished and checkpoint_files(done) == finished
