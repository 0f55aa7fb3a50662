"""Integrity: token files and checkpoints are checked against the checksums written with them, a run
killed at any moment resumes from its newest intact checkpoint (or says it is finished), and the
faults a sweep of real processes found are one line with the documented exit code."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import prepare_owt
import storage
import train
from conftest import ROOT, VOCAB, run, run_argv, scratch, tmpfs, write_tiny_tokens
from checkpoints import from_checkpoint, load_checkpoint, save_checkpoint
from model import GPT, GPTConfig
from test_faults import (PAUSING_TRAIN, assert_one_line_error, finish, run_clis, train_process,
                         wait_until)

BIG = 100_000        # sentences of write_tiny_tokens: a train.bin of ~1.7 MB, more than the header's MiB


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    return write_tiny_tokens(tmp_path_factory.mktemp("bigdata"), train=BIG, val=300)


def copy_data(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def overwrite(path, offset: int, payload: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# =============================================================================
# token files

def test_a_tail_overwritten_past_the_header_is_refused(tmp_path, big_data):
    """The header checksum covers the first MiB; the whole-file checksum covers the rest."""
    assert os.path.getsize(os.path.join(big_data, "train.bin")) > data.HEADER_BYTES + 50_000
    zeros = copy_data(big_data, tmp_path / "zeros")
    overwrite(os.path.join(zeros, "train.bin"), data.HEADER_BYTES + 10, bytes(4000))
    other = copy_data(big_data, tmp_path / "other")            # the tail of another corpus
    foreign = write_tiny_tokens(tmp_path / "foreign", train=BIG, val=300, seed=5)
    with open(os.path.join(foreign, "train.bin"), "rb") as f:
        f.seek(data.HEADER_BYTES)
        overwrite(os.path.join(other, "train.bin"), data.HEADER_BYTES, f.read(50_000))
    for d in (zeros, other):
        with pytest.raises(data.DataError, match=r"train\.bin is not the file meta\.json was written with \(the "
                                                 r"checksum of the whole file differs\).*prepare_owt\.py"):
            data.TokenData(d)
    # ids >= vocab_size past the first MiB, in a file whose checksum agrees (a meta.json that claims a
    # smaller vocabulary): refused at once, not at the first evaluation
    wide = str(tmp_path / "wide")
    ids = np.arange(600_000) % VOCAB
    ids[-5] = 1000
    data.write_token_files(wide, {"train": ids, "val": np.arange(300) % VOCAB}, vocab_size=2000)
    meta = json.load(open(os.path.join(wide, "meta.json")))
    storage.write_json({**meta, "vocab_size": VOCAB}, os.path.join(wide, "meta.json"))
    with pytest.raises(data.DataError, match=rf"wide/train\.bin holds token id 1000, not below vocab_size={VOCAB}"):
        data.TokenData(wide)


def test_meta_json_without_the_whole_file_checksum_is_refused_then_recorded(tmp_path, big_data, capsys):
    """An older meta.json (no whole-file checksums, here not even the header's) accepted a same-size
    val.bin of another data set. Now it is refused, with the command that records the checksums."""
    d = copy_data(big_data, tmp_path / "old")
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    for key in ("sha256", "header_sha256"):
        del meta[key]
    storage.write_json(meta, meta_path)
    os.remove(os.path.join(d, data.VERIFIED_NAME))
    with pytest.raises(data.DataError, match=r"records no checksum of the whole token files.*python prepare_owt\.py "
                                             r"--out .*old --record_checksums"):
        data.TokenData(d)
    with pytest.raises(data.DataError, match="records no checksum"):      # prepare does not take it as finished
        data.finished(d)
    # the user vouches for the files: sizes and ids are checked, then the checksums recorded
    prepare_owt.main(["--out", d, "--record_checksums"])
    assert "recorded the checksums" in capsys.readouterr().out
    assert data.TokenData(d).meta["sha256"] == json.load(open(os.path.join(big_data, "meta.json")))["sha256"]
    # from now on a swapped val.bin of the same size is found
    swapped = np.fromfile(os.path.join(d, "val.bin"), dtype=np.uint16)[::-1].copy()
    swapped.tofile(os.path.join(d, "val.bin"))
    with pytest.raises(data.DataError, match=r"val\.bin is not the file meta\.json was written with"):
        data.TokenData(d)
    # ids beyond the vocabulary are not recorded as good
    bad = copy_data(big_data, tmp_path / "bad")
    storage.write_json({k: v for k, v in meta.items()}, os.path.join(bad, "meta.json"))
    overwrite(os.path.join(bad, "train.bin"), data.HEADER_BYTES + 2, np.array([60000], np.uint16).tobytes())
    with pytest.raises(SystemExit) as e:
        prepare_owt.main(["--out", bad, "--record_checksums"])
    assert e.value.code == 2 and "holds token id 60000" in capsys.readouterr().err


def test_a_file_is_hashed_once_per_state(tmp_path, big_data, monkeypatch):
    d = copy_data(big_data, tmp_path / "d")          # a copy: new inodes, so verified afresh
    calls = []
    real = data.scan_file
    monkeypatch.setattr(data, "scan_file", lambda path, *a, **k: calls.append(os.path.basename(path)) or real(path, *a, **k))
    data.TokenData(d)
    assert sorted(calls) == ["train.bin", "val.bin"]
    data.TokenData(d)
    assert len(calls) == 2                            # unchanged files: not read again
    path = os.path.join(d, "train.bin")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # the same mtime, set back: the ctime still changed
    data.TokenData(d)
    assert calls[2:] == ["train.bin"]
    # a directory that cannot hold the record (read-only, shared): verified each time, still accepted
    monkeypatch.setattr(data, "write_json", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    os.remove(os.path.join(d, data.VERIFIED_NAME))
    data.TokenData(d)
    data.TokenData(d)
    assert len(calls) == 7


# =============================================================================
# checkpoints

def tiny_model():
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32))


def test_a_flipped_byte_in_a_checkpoint_is_refused_naming_it(tmp_path):
    model = tiny_model()
    good = str(tmp_path / "ckpt_best.pt")
    save_checkpoint(model, good, iter_num=3)
    assert load_checkpoint(good)["iter_num"] == 3
    for offset in (100, os.path.getsize(good) // 2, os.path.getsize(good) - 30):    # header, tensors, trailer
        bad = str(tmp_path / f"flipped{offset}" / "ckpt_best.pt")
        os.makedirs(os.path.dirname(bad))
        shutil.copy(good, bad)
        flip_byte(bad, offset)
        with pytest.raises(storage.CorruptFile, match=f"{bad} is (corrupt|truncated or corrupt)"):
            load_checkpoint(bad)
    # the advice names the run directory's other checkpoint when there is one, never the damaged one
    shutil.copy(good, tmp_path / "flipped100" / "ckpt_last.pt")
    with pytest.raises(storage.CorruptFile, match="ckpt_last.pt beside it may be intact") as e:
        load_checkpoint(str(tmp_path / "flipped100" / "ckpt_best.pt"))
    assert "e.g. ckpt_best.pt" not in str(e.value)
    # a checkpoint written before checksums (plain torch.save) still loads
    old = str(tmp_path / "old.pt")
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, old)
    assert not storage.verify_checksum(old)
    from_checkpoint(old)
    # a checksum with its archive cut short
    cut = str(tmp_path / "cut.pt")
    with open(good, "rb") as f:
        payload = f.read()
    with open(cut, "wb") as f:
        f.write(payload[:len(payload) // 2] + payload[-storage.TRAILER_BYTES:])
    with pytest.raises(storage.CorruptFile, match="truncated or damaged"):
        load_checkpoint(cut)


def interrupt_after(monkeypatch, name: str, n: int):
    """Ctrl-C right after the n-th write of `name` in out_dir."""
    real, count = storage.atomic_write, [0]

    def write_then_interrupt(path, write):
        real(path, write)
        count[0] += os.path.basename(path) == name
        if count[0] == n:
            raise KeyboardInterrupt
    monkeypatch.setattr(storage, "atomic_write", write_then_interrupt)


@pytest.mark.parametrize("damaged", ["ckpt_best.pt", "ckpt_last.pt", "both"])
def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, data_dir, monkeypatch, capsys, damaged):
    kw = scratch(max_iters=6, eval_interval=2)
    ref = run(data_dir, tmp_path / "ref", **kw)
    out = tmp_path / "run"
    interrupt_after(monkeypatch, "ckpt_last.pt", 2)                  # both checkpoints at iteration 4
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, out, **kw)
    monkeypatch.undo()
    for name in (["ckpt_best.pt", "ckpt_last.pt"] if damaged == "both" else [damaged]):
        flip_byte(out / name, os.path.getsize(out / name) // 2)
    capsys.readouterr()
    if damaged == "both":
        with pytest.raises(train.ConfigError, match=r"is corrupt.*No intact checkpoint is left in .*run: move it away"):
            run(data_dir, out, **kw)
        return
    with pytest.raises(train.TrainError, match="holds another run"):       # another config: nothing is moved
        run(data_dir, out, **{**kw, "learning_rate": 1e-3})
    assert (out / damaged).exists() and not (out / f"{damaged}.corrupt").exists()
    capsys.readouterr()
    resumed = run(data_dir, out, **kw)
    log = capsys.readouterr().out
    other = "ckpt_last.pt" if damaged == "ckpt_best.pt" else "ckpt_best.pt"
    assert f"warning: {out / damaged} is corrupt" in log and f"Resuming from {other} instead (iteration 4)" in log
    assert resumed["iters"] == [5, 6] and resumed["losses"] == ref["losses"][4:]
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        load_checkpoint(str(out / name))                              # both intact again
    if damaged == "ckpt_best.pt":
        assert (out / "ckpt_best.pt.corrupt").exists()                 # kept for a look, out of the way
        assert load_checkpoint(str(out / "ckpt_best.pt"))["iter_num"] == 6      # a new one, at the next evaluation


@pytest.fixture(scope="module")
def pausing_train(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "pausing_train.py"
    path.write_text(PAUSING_TRAIN)
    return str(path)


@pytest.mark.slow
def test_killed_after_the_final_best_checkpoint_is_finished(tmp_path, data_dir, pausing_train):
    """always_save_checkpoint=False: the final evaluation improves, ckpt_best.pt is written, and the
    kill comes in its copy to ckpt_last.pt. The same command then finds the run finished, every time."""
    out = tmp_path / "run"
    args = run_argv(data_dir, out, **scratch(max_iters=4, eval_interval=2, always_save_checkpoint=False))
    paused = tmp_path / "paused"
    proc = train_process(pausing_train, args, PAUSE_WRITE="ckpt_last.pt:2", PAUSED=str(paused))
    assert wait_until(paused.exists, proc), finish(proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert load_checkpoint(str(out / "ckpt_best.pt"))["iter_num"] == 4
    assert load_checkpoint(str(out / "ckpt_last.pt"))["iter_num"] == 2
    for _ in range(2):
        again = finish(train_process("train.py", args))
        assert again.returncode == 0, again.stderr
        assert f"the run in {out} is finished (iteration 4 of 4" in again.stdout and "iter 3:" not in again.stdout
    assert load_checkpoint(str(out / "ckpt_last.pt"))["iter_num"] == 4          # repaired from ckpt_best.pt
    assert json.load(open(out / "run.json"))["finished"]


# =============================================================================
# one line, the documented exit code

@pytest.mark.slow
def test_faults_of_the_sweep_are_one_line(tmp_path, data_dir, big_data, tiny_hf_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    tail = copy_data(big_data, tmp_path / "tail")
    overwrite(os.path.join(tail, "train.bin"), data.HEADER_BYTES + 10, bytes(4000))
    wide = str(tmp_path / "wide")                      # ids >= vocab_size past the first MiB, checksum intact
    ids = np.arange(600_000) % VOCAB
    ids[-5] = 1000
    data.write_token_files(wide, {"train": ids, "val": np.arange(300) % VOCAB}, vocab_size=2000)
    meta = json.load(open(os.path.join(wide, "meta.json")))
    storage.write_json({**meta, "vocab_size": VOCAB}, os.path.join(wide, "meta.json"))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(1001))
    corrupt = tmp_path / "corrupt" / "ckpt_best.pt"
    os.makedirs(corrupt.parent)
    save_checkpoint(tiny_model(), str(corrupt))
    flip_byte(corrupt, os.path.getsize(corrupt) // 2)
    study_file = tmp_path / "study.py"
    study_file.write_text(f"teacher = {tiny_hf_dir!r}\ndata_dir = {data_dir!r}\nout_dir = {str(tmp_path / 'study')!r}\n"
                          "runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2))]\neval_datasets = ['foo']\n"
                          "device = 'cpu'\nmax_iters = 2\n")
    new = scratch(max_iters=2, eval_interval=2)

    def train_args(out, **kw):
        return ("train.py", *run_argv(kw.pop("data_dir", data_dir), out, **{**new, **kw}))

    cases = [
        (train_args(a_file), f"out_dir='{a_file}' is a file, not a directory"),
        (train_args(a_file / "sub"), f"out_dir {a_file / 'sub'} cannot be a directory: a part of that path is a file"),
        (train_args(tmp_path / "empty", init_from="resume"), "init_from='resume' but there is no"),
        (train_args(tmp_path / "inf") + ("--learning_rate=1e999",), "learning_rate=inf is not a finite number"),
        (train_args(tmp_path / "hub", init_from="no-owner/no-such-model"), "could not build the model for init_from="),
        (train_args(tmp_path / "tail_run", data_dir=tail), "train.bin is not the file meta.json was written with"),
        (train_args(tmp_path / "wide_run", data_dir=wide), f"train.bin holds token id 1000, not below vocab_size={VOCAB}"),
        (("prepare_owt.py", "--dataset", "x.txt", "--out", a_file / "sub"),
         f"--out {a_file / 'sub'} cannot be a directory: a part of that path is a file"),
        (("eval_ppl.py", "--model", tiny_hf_dir, "--data_file", os.path.join(data_dir, "meta.json")),
         "is a .json file, not a data set"),
        (("eval_ppl.py", "--model", tiny_hf_dir, "--data_file", odd),
         "not odd.bin; its 1,001 bytes are not even a whole number of uint16 tokens"),
        (("eval_ppl.py", "--model", corrupt, "--data_file", os.path.join(data_dir, "val.bin")),
         f"{corrupt} is corrupt: its contents do not match the checksum"),
        (("sample.py", "--model", tiny_hf_dir, "--temperature", "inf"), "--temperature inf: must be a finite number"),
        (("study.py", study_file), "eval_datasets: unknown data set(s) 'foo'"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, c[0]), *map(str, c[1:])], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c, _ in cases]
    for (command, message), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        assert_one_line_error(subprocess.CompletedProcess(command, proc.returncode, out, err), message)
    assert not (tmp_path / "study").exists() and not (tmp_path / "inf").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs mount (root and a working mount needed; skipped elsewhere)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        yield disk


@pytest.mark.slow
def test_a_read_only_output_is_one_line_exit_1(tmp_path, data_dir, read_only_dir):
    procs = run_clis([("train.py", *run_argv(data_dir, read_only_dir / "run", **scratch(max_iters=2))),
                      ("prepare_owt.py", "--dataset", "x.txt", "--out", read_only_dir),
                      ("prepare_owt.py", "--dataset", "x.txt", "--out", read_only_dir / "new")])
    for proc in procs:
        assert_one_line_error(proc, "is on a read-only file system; choose a writable place", code=1)


@pytest.mark.slow
@pytest.mark.parametrize("script, code", [("train.py", 1), ("eval_ppl.py", 130)])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, data_dir, script, code):
    """SIGINT while the script still imports torch, before main() runs."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    maps = f"/proc/{proc.pid}/maps"
    if not os.path.exists(maps):
        proc.kill()
        pytest.skip("no /proc to see the import of torch")

    def importing_torch():
        try:
            with open(maps) as f:
                return "libtorch" in f.read()
        except OSError:
            return False
    assert wait_until(importing_torch, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err == "interrupted\n" and out == "", (proc.returncode, err)
