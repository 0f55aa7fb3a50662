"""study.py on a tiny configuration: a teacher trained first, runs compressed from it, the records,
table and plot; a killed study resumes without redoing finished runs; bad study files are clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import plots
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
    from checkpoints import save_checkpoint
    from conftest import gpt
    spec, common = study.load_study(study_file(tmp_path, data_dir), [])
    _, plans = study.plan_runs(spec, common, "study.py")
    os.makedirs(plans[0]["dir"])
    save_checkpoint(gpt(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16),
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


# ----------------------------------------------------------------------------- the plot, the budget, the ETA

def fake_records(n=20):
    """A teacher and n runs as study.json holds them, sizes shared by several runs, one run failed,
    starting losses far above the rest (as a model from scratch has)."""
    import math
    ev = lambda loss, size: [{"dataset": "data/x/val.bin", "ppl": math.exp(loss), "num_params": size}]
    records = [{"name": "teacher", "keys": {}, "status": "ok", "num_params": 124_000_000, "val_loss_start": 3.1,
                "val_loss": 3.1, "curve": [], "eval": ev(3.1, 124_000_000), "tokens": 0}]
    for i in range(n):
        size = (81_000_000, 96_000_000, 67_000_000, 92_000_000)[i % 4]
        start, end = 3.3 + (8.0 if i % 7 == 0 else 0.1 * i), 3.15 + 0.01 * i
        curve = [[t * 1_000_000, end + (start - end) * math.exp(-t)] for t in range(6)]
        failed = i == 5
        records.append({"name": f"run {i}", "keys": {}, "status": "failed (exit 1)" if failed else "ok",
                        "num_params": size, "val_loss_start": start, "val_loss": end, "curve": curve[:2 if failed else 6],
                        "eval": [] if failed else ev(end + 0.02, size), "tokens": 5_000_000})
    return records


def test_plot_of_twenty_runs_tells_every_run_apart_and_shows_every_point(tmp_path):
    records = study.ordered(fake_records())
    names = [r["name"] for r in records[1:]]
    styles = plots.run_styles(names)
    assert len(set(styles.values())) == len(names) == 20
    fig = plots.figure(records, "study fake.py --max_iters=20")
    fig.draw_without_rendering()
    loss, size, ranked = fig.axes
    # the loss panel: one line per run with its style, every point inside the limits
    lines = [l for l in loss.get_lines() if l.get_color() != "black"]              # black: the teacher's line
    assert len(lines) == 20 and len({(l.get_color(), l.get_marker(), l.get_linestyle()) for l in lines}) == 20
    for l in loss.get_lines():
        for x, y in zip(l.get_xdata(), l.get_ydata()):
            assert loss.get_xlim()[0] <= x <= loss.get_xlim()[1] and loss.get_ylim()[0] <= y <= loss.get_ylim()[1]
    # the size and ranked panels: every run that has a perplexity (19, one failed) and the teacher
    for ax, expected in ((size, 19 + 1), (ranked, 19)):
        points = [p for c in ax.collections for p in c.get_offsets()]
        assert len(points) == expected
        (x0, x1), (y0, y1) = ax.get_xlim(), sorted(ax.get_ylim())
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in points)
    # panel 2's points: nowhere two drawn on top of each other
    drawn = [c.get_offset_transform().transform(c.get_offsets())[0] for c in size.collections]
    assert min(((a - b) ** 2).sum() ** 0.5 for i, a in enumerate(drawn) for b in drawn[:i]) > 5
    # labelled ticks on every axis, the log ones included; one legend entry per run and the teacher
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
            assert len(labels) >= 2, (ax.get_title(), labels)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(legend) == 21 and "run 5 (96.00M) - failed" in legend
    assert fig._suptitle.get_text() == "study fake.py --max_iters=20"
    png = tmp_path / "study.png"
    plots.plot(records, str(png), "study fake.py")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_swarm_offsets_keep_points_apart():
    ys = [0.0, 1.0, 2.0, 2.5, 30.0, 3.0]
    xs = plots.swarm_offsets(ys, 7.5)
    assert xs[4] == 0.0 and xs[0] == 0.0                      # a point with room stays on its line
    for i in range(len(ys)):
        for j in range(i):
            assert ((xs[i] - xs[j]) ** 2 + (ys[i] - ys[j]) ** 2) ** 0.5 >= 7.5


def test_replot_draws_study_png_from_study_json(tmp_path, capsys):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(fake_records(3)))
    study.main(["--replot", str(path)])
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(study.StudyError, match="no such file"):
        study.main(["--replot", str(tmp_path / "nothing.json")])


def test_command_line_budget_applies_to_the_teacher_too(tmp_path, data_dir, monkeypatch):
    """`--max_iters=2` on the command line: the teacher (whose dict sets max_iters=30) and every run
    train 2 steps; the study file's other keys stay."""
    spec, common = study.load_study(study_file(tmp_path, data_dir), ["--max_iters=2", "--eval_interval=1"])
    teacher, plans = study.plan_runs(spec, common, "study.py")
    assert [p["cfg"].max_iters for p in [teacher] + plans] == [2] * 4
    assert teacher["cfg"].learning_rate == 3e-3 and plans[0]["cfg"].learning_rate == 1e-3
    # through the CLI: the command study.py starts for the teacher (failing here, so nothing else runs)
    commands = []

    def fake_run(cmd, log_path, echo):
        commands.append(cmd)
        return 1
    monkeypatch.setattr(study, "run_logged", fake_run)
    with pytest.raises(study.StudyError, match="the teacher failed"):
        study.main([study_file(tmp_path, data_dir), "--max_iters=2"])
    assert len(commands) == 1 and "--max_iters=2" in commands[0] and "--learning_rate=0.003" in commands[0]


def test_eta_of_the_runs_left(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(study.time, "time", lambda: now[0])
    eta = study.Eta([100, 20, 20, 40])
    eta.start()
    now[0] += 50.0                                         # the teacher: 100 steps in 50 s
    eta.done(True, "[1/4]")
    assert capsys.readouterr().out == "[1/4] 3 run(s) left, ETA 40s\n"
    eta.start()
    eta.done(False, "[2/4]")                               # skipped: no time, no steps
    assert capsys.readouterr().out == "[2/4] 2 run(s) left, ETA 30s\n"
    eta.start()
    now[0] += 70.0                                         # 120 steps in 120 s
    eta.done(True, "[3/4]")
    assert capsys.readouterr().out == "[3/4] 1 run(s) left, ETA 40s\n"
    eta.start()
    eta.done(True, "[4/4]")
    assert capsys.readouterr().out == ""


def test_a_teacher_whose_evaluation_fails_is_not_ok(tmp_path, data_dir, monkeypatch, capsys):
    """Every evaluation failing (e.g. offline) shows in the teacher's status too, and study.py's exit code."""
    spec, common = study.load_study(study_file(tmp_path, data_dir), [])
    teacher, plans = study.plan_runs(spec, common, "study.py")
    summary = {"status": "ok", "history": [{"tokens": 0, "val": 4.0}], "best_val_loss": 4.0, "num_params": 1}
    monkeypatch.setattr(study, "train_run", lambda plan, index, echo: dict(summary))
    monkeypatch.setattr(study, "evaluate", lambda *a, **k: None)
    monkeypatch.setattr(study, "write_outputs", lambda *a, **k: None)
    records = study._run(spec, teacher, plans, "study.py", "study study.py")
    assert [r["status"].split(":")[0] for r in records] == ["evaluation failed"] * (1 + len(plans))
    assert "teacher: evaluation failed" in capsys.readouterr().out
