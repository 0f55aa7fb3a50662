"""study.py on a tiny configuration: a teacher trained first, runs compressed from it, the records,
table and plot; a killed study resumes without redoing finished runs; bad study files are clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import study
from conftest import ROOT, write_tiny_tokens

TINY = """
teacher = dict(name="teacher", init_from="scratch", n_layer=2, n_head=2, n_embd=32, vocab_size=64, max_iters=30,
               learning_rate=3e-3)
data_dir = {data_dir!r}
out_dir = {out_dir!r}
runs = [dict(name="vl-norm B2x2", mlp="kron", kron_b_shape=(2, 2)),
        dict(name="scratch B2x2", mlp="kron", kron_b_shape=(2, 2), init_from="scratch", n_layer=2, n_head=2,
             n_embd=32, vocab_size=64),
        dict(name="vl-norm B2x2 + KD", mlp="kron", kron_b_shape=(2, 2), distill_from="teacher")]
max_iters = 6
eval_interval = 3
eval_iters = 2
block_size = 16
batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 1e-3
warmup_iters = 0
decay_lr = False
device = "cpu"
dtype = "float32"
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_tokens(tmp_path_factory.mktemp("study_data"), train=1500, val=300)


def study_file(tmp_path, data_dir, text=TINY, name="study.py", **fmt):
    path = tmp_path / name
    path.write_text(text.format(data_dir=data_dir, out_dir=str(tmp_path / "out"), **fmt))
    return str(path)


def mtimes(out):
    return {r: os.stat(os.path.join(out, r, "ckpt_last.pt")).st_mtime_ns
            for r in os.listdir(out) if os.path.isfile(os.path.join(out, r, "ckpt_last.pt"))}


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, data_dir, capsys):
    path = study_file(tmp_path, data_dir)
    records = study.main([path])
    out = tmp_path / "out"
    saved = json.loads((out / "study.json").read_text())
    assert [r["name"] for r in saved] == ["teacher", "vl-norm B2x2", "scratch B2x2", "vl-norm B2x2 + KD"]
    assert saved == json.loads(json.dumps(records))
    teacher, vl, scratch, kd = saved
    assert all(r["status"] == "ok" for r in saved)
    # the contract's fields; sizes are the paper's count of the models actually trained
    for r in saved:
        for key in ("name", "num_params", "val_loss_start", "val_loss", "curve", "eval"):
            assert key in r
        assert r["eval"][0]["dataset"].endswith("val.bin") and r["eval"][0]["protocol"] == "paper"
    assert teacher["val_loss_start"] == teacher["val_loss"]
    assert vl["num_params"] == scratch["num_params"] == kd["num_params"] < teacher["num_params"]
    assert [t for t, _ in vl["curve"]] == [0, 192, 384] and vl["tokens"] == 384
    assert vl["curve"][0][1] == vl["val_loss_start"] and vl["val_loss"] == min(v for _, v in vl["curve"])
    # compressing the trained teacher starts far better than a model of that size from scratch
    assert vl["val_loss_start"] < scratch["val_loss_start"] - 0.3
    assert vl["eval"][0]["ppl"] < scratch["eval"][0]["ppl"]
    table = (out / "study.md").read_text()
    lines = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| run")]
    assert [l.split(" | ")[0][2:] for l in lines] == ["teacher", "scratch B2x2", "vl-norm B2x2", "vl-norm B2x2 + KD"]
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in ("teacher", "vl-norm-b2x2", "scratch-b2x2"):
        assert (out / r / "train.log").stat().st_size > 0
    # a second run of the same command redoes nothing
    before = mtimes(out)
    capsys.readouterr()
    again = study.main([path])
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert mtimes(out) == before and [r["val_loss"] for r in again] == [r["val_loss"] for r in saved]
    # a run whose keys changed is an error naming it; nothing is retrained
    changed = study_file(tmp_path, data_dir, TINY.replace('kron_b_shape=(2, 2))', 'kron_b_shape=(2, 2), seed=7)', 1))
    with pytest.raises(study.StudyError, match="'vl-norm B2x2'.*seed: 1337 -> 7"):
        study.main([changed])
    assert mtimes(out) == before


@pytest.mark.slow
def test_killed_study_resumes_without_redoing_finished_runs(tmp_path, data_dir):
    # long enough after the first checkpoint (iteration 20) that the kill lands in the middle of the run
    text = TINY.replace("max_iters = 6", "max_iters = 200").replace("eval_interval = 3", "eval_interval = 20")
    path = study_file(tmp_path, data_dir, text)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "study.py", path], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    second = out / "vl-norm-b2x2" / "ckpt_last.pt"
    deadline = time.time() + 240
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert second.exists(), "the second run never saved a checkpoint"
    teacher_mtime = os.stat(out / "teacher" / "ckpt_last.pt").st_mtime_ns
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)                           # its training child ends with it (PR_SET_PDEATHSIG)
    assert not (out / "vl-norm-b2x2" / "run.json").exists(), "the run finished before the kill"
    done = subprocess.run([sys.executable, "study.py", path], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "teacher: finished earlier, skipped" in done.stdout
    assert os.stat(out / "teacher" / "ckpt_last.pt").st_mtime_ns == teacher_mtime
    log = (out / "vl-norm-b2x2" / "train.log").read_text()
    assert "resuming" in log                  # the interrupted run continued from its checkpoint
    saved = json.loads((out / "study.json").read_text())
    assert all(r["status"] == "ok" for r in saved) and saved[1]["tokens"] == 200 * 64


BAD = [
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2), learning_rat=1e-3)]", "run 'a'.*learning_rat.*learning_rate"),
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2)), dict(name='a', mlp='dense')]", "'a' is used twice"),
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(3, 3))]", "run .a.*B shape \\(3, 3\\) does not tile"),
    ("runs = [dict(mlp='kron')]", "every run is a dict with a 'name'"),
    ("runs = []", "non-empty list"),
    # found before anything trains, not after every run has trained and failed its evaluation
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2))]\neval_datasets = ['foo']",
     r"eval_datasets: unknown data set\(s\) 'foo'; choose from wikitext-103"),
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2))]\neval_data_files = ['no/such.txt']",
     "eval_data_files: no such file 'no/such.txt'"),
    ("runs = [dict(name='a', mlp='kron', kron_b_shape=(2, 2), distill_from='teacher', "
     "distill_temperature=float('inf'))]", "run 'a': distill_temperature=inf is not a finite number"),
]


@pytest.mark.parametrize("runs,match", BAD)
def test_bad_study_files_are_clear_errors(tmp_path, data_dir, runs, match):
    text = TINY.split("runs = [")[0] + runs + "\nmax_iters = 2\n"
    with pytest.raises(study.StudyError, match=match):
        study.main([study_file(tmp_path, data_dir, text)])
    assert not (tmp_path / "out").exists()                # refused before any work


def test_teacher_dict_without_a_name_and_a_run_named_like_the_teacher(tmp_path, data_dir, hf_dir):
    # a teacher dict without "name" is called "teacher"; the runs start from its directory
    text = TINY.replace('teacher = dict(name="teacher", ', "teacher = dict(")
    spec, common = study.load_study(study_file(tmp_path, data_dir, text), [])
    teacher, plans = study.plan_runs(spec, common, "study.py")
    assert teacher["name"] == "teacher" and teacher["dir"] == str(tmp_path / "out" / "teacher")
    assert plans[0]["cfg"].init_from == teacher["dir"] and plans[2]["cfg"].distill_from == teacher["dir"]
    # a given teacher is measured in out/teacher: no run may take that directory
    text = (f"teacher = {hf_dir!r}\n" "data_dir = {data_dir!r}\nout_dir = {out_dir!r}\n"
            "runs = [dict(name='Teacher', mlp='kron', kron_b_shape=(2, 2))]\n")
    with pytest.raises(study.StudyError, match="'Teacher' is used twice.*given teacher"):
        study.main([study_file(tmp_path, data_dir, text)])
    assert not (tmp_path / "out").exists()


def test_changed_keys_are_found_in_a_run_killed_before_its_first_ckpt_last(tmp_path, data_dir):
    """A kill between a run's first ckpt_best.pt and its copy ckpt_last.pt: train.py would resume
    from ckpt_best.pt, so the study checks that one's keys up front."""
    from model import GPT, GPTConfig
    spec, common = study.load_study(study_file(tmp_path, data_dir), [])
    _, plans = study.plan_runs(spec, common, "study.py")
    os.makedirs(plans[0]["dir"])
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16)).save_checkpoint(
        os.path.join(plans[0]["dir"], "ckpt_best.pt"), config={**plans[0]["cfg"].flat(), "seed": 7})
    changed = study.changed_runs(plans)
    assert len(changed) == 1 and changed[0].startswith("'vl-norm B2x2'") and "seed" in changed[0]


@pytest.mark.slow
def test_teacher_that_cannot_be_loaded_and_cli_errors(tmp_path, data_dir):
    text = TINY.replace(TINY.split("data_dir")[0], "teacher = 'no/such/teacher.pt'\n")
    with pytest.raises(study.StudyError, match="teacher='no/such/teacher.pt' cannot be loaded.*no such file"):
        study.main([study_file(tmp_path, data_dir, text)])
    proc = subprocess.run([sys.executable, "study.py", study_file(tmp_path, data_dir, text)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: teacher=")


def test_study_presets_resolve(tmp_path):
    """Every configs/study_*.py plans: each run resolves to a valid train.py config."""
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.startswith("study_"))
    assert {"study_mini.py", "study_gpt2.py"} <= set(presets)
    for name in presets:
        path = os.path.join(ROOT, "configs", name)
        spec, common = study.load_study(path, [f"--out_dir={str(tmp_path / name)!r}"])
        teacher, plans = study.plan_runs(spec, common, path)
        assert len(plans) >= 8 and len({p["dir"] for p in plans}) == len(plans)


def test_a_teacher_whose_evaluation_fails_is_not_ok(tmp_path, data_dir, monkeypatch, capsys):
    """Every evaluation failing (e.g. offline) shows in the teacher's status too, and study.py's exit code."""
    spec, common = study.load_study(study_file(tmp_path, data_dir), [])
    teacher, plans = study.plan_runs(spec, common, "study.py")
    summary = {"status": "ok", "history": [{"tokens": 0, "val": 4.0}], "best_val_loss": 4.0, "num_params": 1}
    monkeypatch.setattr(study, "train_run", lambda plan, index, echo: dict(summary))
    monkeypatch.setattr(study, "evaluate", lambda *a, **k: None)
    monkeypatch.setattr(study, "write_outputs", lambda *a, **k: None)
    records = study._run(spec, teacher, plans, "study.py")
    assert [r["status"].split(":")[0] for r in records] == ["evaluation failed"] * (1 + len(plans))
    assert "teacher: evaluation failed" in capsys.readouterr().out
