"""Faults, each reproduced for real: a user's mistake ends in one line on stderr (exit code 2, no
traceback) before any expensive work, and an interrupted job (SIGKILL, Ctrl-C, a full disk) leaves
the previous output intact, never a mixture.

Sections: data (prepare_owt.py, data.TokenData), export (export_hf.py), eval (eval_ppl.py),
sample (sample.py)."""
import errno
import hashlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import eval_ppl
import export_hf
import prepare_owt
import sample
import storage
from conftest import ROOT, TIKTOKEN_CACHE
from model import GPT

ENV = {**os.environ, "TIKTOKEN_CACHE_DIR": TIKTOKEN_CACHE}
WORDS = ["alpha", "beta", "gamma", "delta", "kronecker", "matrix", "sum", "product", "factor", "token",
         "the", "of", "and", "über", "東京"]


def write_corpus(path, paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of random words separated by blank lines (one document each for prepare)."""
    rng = np.random.default_rng(seed)
    paras = [" ".join(rng.choice(WORDS, size=rng.integers(20, 80))) for _ in range(paragraphs)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return str(path)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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


def assert_one_line_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.args, proc.returncode, proc.stderr)
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


def test_killed_overwrite_leaves_the_old_output_or_the_new_one(tmp_path, corpora, tiktoken_gpt2):
    out = str(tmp_path / "out")
    data.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)

    def in_temp(name):
        return lambda: any(os.path.exists(os.path.join(tmp_path, t, name)) for t in temp_dirs(tmp_path) - stale)

    killed = []
    for moment in ("meta.json", "temp dir", "train.bin"):
        stale = temp_dirs(tmp_path)             # what earlier kills left; the new run removes it
        proc = cli("prepare_owt.py", "--dataset", corpora["new"], "--out", out, "--overwrite", "--num-proc", "1")
        cond = (lambda: bool(temp_dirs(tmp_path) - stale)) if moment == "temp dir" else in_temp(moment)
        if wait_until(cond, proc):
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            killed.append(moment)
        restored = not os.path.exists(out)
        if restored:            # killed between the swap's two renames: the next run restores the old output
            assert data.prepare(corpora["new"], out)["source"] == corpora["old"]
        # the old output whole, or (killed after the swap) the new one whole: never a mixture
        names = set(os.listdir(out)) - {data.LOCK_NAME}
        assert names == {"train.bin", "val.bin", "meta.json"}, (moment, names)
        if snapshot(out) != old:                   # the kill came after the swap, or the run finished
            meta = data.TokenData(out).meta         # checks sizes and checksums against meta.json
            assert meta["source"] == corpora["new"]
            data.prepare(corpora["old"], out, val_fraction=0.1, overwrite=True)
            assert snapshot(out) == old             # the same input gives the same files
        else:
            assert data.TokenData(out).meta["source"] == corpora["old"]
            assert proc.returncode != -signal.SIGKILL or restored or temp_dirs(tmp_path), "the killed run's temp dir"
    assert killed[-2:] == ["temp dir", "train.bin"], killed
    # the next run removes what the kills left, and leaves a finished output alone
    assert data.prepare(corpora["new"], out)["source"] == corpora["old"]
    assert not leftovers(tmp_path) and snapshot(out) == old


def test_ctrl_c_during_overwrite_keeps_the_old_output(tmp_path, corpora, tiktoken_gpt2):
    out = str(tmp_path / "out")
    data.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    proc = cli("prepare_owt.py", "--dataset", corpora["new"], "--out", out, "--overwrite", "--num-proc", "1")
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
    data.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    moved = tmp_path / f"{storage.TEMP_PREFIX}out.old.k1ll3d00"
    os.replace(out, moved)
    shutil.copytree(moved, tmp_path / f"{storage.TEMP_PREFIX}out.n3wd1r00")       # the new one, complete
    capsys.readouterr()
    assert data.prepare(corpora["new"], out)["source"] == corpora["old"]
    assert "restored" in capsys.readouterr().out
    assert snapshot(out) == old and not leftovers(tmp_path)


def test_second_prepare_waits_for_the_first(tmp_path, corpora, tiktoken_gpt2):
    """Runs of a sweep that share a data_dir: the second waits, then finds the output finished."""
    out = tmp_path / "out"
    with data._output_lock(str(out)):              # the first run, in the middle of its work
        proc = cli("prepare_owt.py", "--dataset", corpora["old"], "--out", out, "--num-proc", "1")
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
    data.prepare(corpora["old"], a, val_fraction=0.1)
    data.prepare(corpora["old"], b, val_fraction=0.1, seed=7)      # another split of the same text
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
    # a meta.json without checksums (an older prepare_owt.py): the size agrees, so the batch check
    # must stop the random ids before they reach an embedding
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    del meta["header_sha256"]
    storage.write_json(meta, meta_path)
    td = data.TokenData(d)
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


def test_bad_file_among_good_ones_and_the_cli_process(tmp_path, corpora, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(corpora["old"], folder / "a.txt")
    (folder / "b.txt").write_bytes(b"\xff\xfe h\x00i\x00")          # UTF-16, a common surprise
    out = tmp_path / "out"
    proc = run_clis([("prepare_owt.py", "--dataset", folder, "--out", out)])[0]
    assert_one_line_error(proc, f"{folder / 'b.txt'} is not UTF-8 text (byte 0xff at offset 0)")
    for argv, message in ((["--num-proc", "0"], "--num-proc must be an integer >= 1, got 0"),
                          (["--out", corpora["old"]], f"--out {corpora['old']} is a file")):
        with pytest.raises(SystemExit) as e:
            prepare_owt.main(["--dataset", corpora["old"], "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=0.0), r"--val-fraction must be in \(0, 1\), got 0.0"),
    (dict(val_fraction=1.0), r"--val-fraction must be in \(0, 1\), got 1.0"),
    (dict(val_fraction=math.nan), r"--val-fraction must be in \(0, 1\), got nan"),
    (dict(num_proc=0), "--num-proc must be an integer >= 1, got 0"),
    (dict(txt_docs="page"), "--txt-docs must be one of"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, corpora, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match=message):
        data.prepare(corpora["old"], str(out), **kwargs)
    assert not out.exists()


def test_output_directory_rules(tmp_path, corpora, tiktoken_gpt2):
    # train.py downloads a missing source into data_dir and prepares data_dir from it: the swap keeps it
    out = tmp_path / "data"
    out.mkdir()
    shutil.copy(corpora["old"], out / "copy.txt")
    data.prepare(str(out / "copy.txt"), str(out), val_fraction=0.1)
    data.prepare(str(out / "copy.txt"), str(out), val_fraction=0.2, overwrite=True)
    assert sha(out / "copy.txt") == sha(corpora["old"])
    assert data.TokenData(str(out)).meta["val_fraction"] == 0.2
    assert sorted(os.listdir(out)) == ["copy.txt", "meta.json", "train.bin", "val.bin"]
    # a directory with sub-directories is not replaced whole
    (out / "notes").mkdir()
    with pytest.raises(data.DataError, match="holds notes, which no prepared dataset has"):
        data.prepare(corpora["old"], str(out), overwrite=True)
    # a symlinked output stays a link to where the data lives
    real = tmp_path / "bigdisk" / "data"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    data.prepare(corpora["old"], str(tmp_path / "link"), val_fraction=0.1)
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
    data.prepare(corpora["old"], out, val_fraction=0.1)
    old = snapshot(out)
    if where == "train.bin":        # the space for a bin is reserved before it is written
        monkeypatch.setattr(os, "posix_fallocate", full_disk)
    else:
        monkeypatch.setattr(data, "write_json", meta_on_a_full_disk)
    with pytest.raises(storage.DiskFull, match=f"no space left on the device while writing {out}"):
        data.prepare(corpora["old"], out, val_fraction=0.2, overwrite=True)
    assert snapshot(out) == old and not leftovers(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare_owt.main(["--dataset", corpora["old"], "--out", out, "--overwrite"])
    err = capsys.readouterr().err                  # the progress bars, then one line
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: no space left on the device while writing {out}")
    assert snapshot(out) == old and not leftovers(tmp_path)


def test_download(tmp_path, monkeypatch):
    src = tmp_path / "remote.txt"
    src.write_text("some text\n" * 1000)
    dest = tmp_path / "local" / "copy.txt"
    with pytest.raises(data.DataError, match=r"could not download file://.*missing\.txt .*put the file at"):
        data.download((tmp_path / "missing.txt").as_uri(), str(dest), log=lambda m: None)
    assert not dest.exists()
    # interrupted half-way: no partial file where the next run would take it for the whole one

    def half_then_ctrl_c(fsrc, fdst, length=0):
        fdst.write(fsrc.read(100))
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "copyfileobj", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        data.download(src.as_uri(), str(dest), log=lambda m: None)
    assert not dest.exists() and not leftovers(tmp_path)
    monkeypatch.undo()
    assert data.download(src.as_uri(), str(dest), log=lambda m: None) == str(dest)
    assert sha(dest) == sha(src) and not leftovers(tmp_path)


# =============================================================================
# export: export_hf.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_hf_dir):
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    GPT.from_pretrained(tiny_hf_dir, mlp="kron", kron_shape=(32, 8)).save_checkpoint(path)
    return path


def test_export_out_rules(tmp_path, tiny_ckpt, monkeypatch):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "generation_config.json").write_text("{}")      # left by an earlier export of another tool
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    procs = run_clis([("export_hf.py", "--model", tiny_ckpt, "--out", out),
                      ("export_hf.py", "--model", tiny_ckpt, "--out", a_file)])
    assert_one_line_error(procs[0], f"--out {out} is not empty; add --overwrite")
    assert_one_line_error(procs[1], f"--out {a_file} is a file")
    assert os.listdir(out) == ["generation_config.json"] and a_file.read_text() == "keep me"

    export_hf.main(["--model", tiny_ckpt, "--out", str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]     # nothing old survives
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

@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    write_corpus(path, 8, seed=3)
    return str(path)


def test_eval_cli_mistakes(tmp_path, tiny_hf_dir, small_text):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9\n".encode("latin-1"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ("--model", tiny_hf_dir, "--data-file", small_text, "--device", "cpu")
    cases = [      # (arguments, the error, whether to run it as a process too)
        (base + ("--protocol", "sliding", "--stride", "0"), "--stride 0: must be >= 1", True),
        (base + ("--protocol", "sliding", "--stride", "-5"), "--stride -5: must be >= 1", False),
        (base + ("--stride", "16"), "--stride applies to --protocol sliding only", False),
        (base + ("--protocol", "sliding", "--block-size", "32", "--stride", "32"), "--stride 32 must be below", False),
        (base + ("--block-size", "1"), "--block-size 1: must be >= 2", False),
        (base + ("--batch-size", "0"), "--batch-size 0: must be >= 1", False),
        (base + ("--limit-tokens", "1"), "--limit-tokens 1: must be >= 2", False),
        (base + ("--out", a_file / "results.json"), f"--out {a_file / 'results.json'}: cannot write in {a_file}", True),
        (base + ("--out", tmp_path), f"--out {tmp_path} is a directory", False),
        # the typo is the second model: it fails before the first one or any dataset is loaded
        (("--model", tiny_hf_dir, "--model", tmp_path / "typo.pt", "--datasets", "wikitext-2"),
         f"no such directory or checkpoint: --model {tmp_path / 'typo.pt'}", True),
        (("--model", tiny_hf_dir, "--data-file", latin1, "--device", "cpu"),
         f"--data-file {latin1} is not UTF-8 text (byte 0xe9 at offset 3)", True),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ("--device", "cuda"), "torch sees no CUDA GPU", False))
    for args, message, _ in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            eval_ppl.main([str(a) for a in args])
        assert message in str(e.value) and "\n" not in str(e.value)
    procs = run_clis([("eval_ppl.py", *args) for args, _, as_process in cases if as_process])
    for proc, message in zip(procs, [m for _, m, as_process in cases if as_process]):
        assert_one_line_error(proc, message)
        assert proc.stdout == ""                  # nothing evaluated: no table
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
    argv = ["--model", tiny_hf_dir, "--data-file", small_text, "--device", "cpu", "--block-size", "32",
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

def test_sample_cli_mistakes(tmp_path, tiny_hf_dir):
    base = ("--model", tiny_hf_dir, "--device", "cpu")
    cases = [      # (arguments, the error, whether to run it as a process too)
        (base + ("--num-samples", "0"), "--num-samples 0: must be >= 1", True),
        (base + ("--max-new-tokens", "-5"), "--max-new-tokens -5: must be >= 1", True),
        (base + ("--top-k", "0"), "--top-k 0: must be >= 1", True),
        (base + ("--prompt-file", tmp_path / "none.txt"), f"--prompt-file {tmp_path / 'none.txt'}: no such file", True),
        (base + ("--top-p", "1.5"), "--top-p 1.5: must be in (0, 1]", False),
        (base + ("--temperature", "-1"), "--temperature -1.0: must be >= 0", False),
        (("--model", tmp_path / "none.pt"), "no such directory or checkpoint", False),
    ]
    for args, message, _ in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            sample.main([str(a) for a in args])
        assert message in str(e.value) and "\n" not in str(e.value)
    procs = run_clis([("sample.py", *args) for args, _, as_process in cases if as_process])
    for proc, message in zip(procs, [m for _, m, as_process in cases if as_process]):
        assert_one_line_error(proc, message)
        assert proc.stdout == ""
