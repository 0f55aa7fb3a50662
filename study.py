"""
A study: one teacher, one data directory, one training budget, and a grid of compression setups
started from the teacher, each trained by train.py and evaluated by eval_ppl.py (the same code
paths a user runs), compared in one table and one plot.

    python study.py configs/study_mini.py                    # a 2-core laptop, offline, under an hour
    python study.py configs/study_gpt2.py                    # the paper's grid, on a GPU
    python study.py configs/study_mini.py --max_iters=20 --out_dir=out-study-smoke   # a smoke test of the whole study
    python study.py --replot out-study-mini/study.json        # study.png again, from study.json alone

A study file is plain Python assignments:

    teacher = "gpt2"          # hub name, HF directory, checkpoint or run directory; or a dict of train.py
                              # keys with a "name", which the study trains first and then uses
    data_dir = "data/openwebtext"
    out_dir = "out-study"
    eval_data_files = []      # extra text files (or token .bin files), scored with eval_ppl's protocol
    eval_datasets = []        # hub datasets of eval_ppl.py (wikitext-103, wikitext-2, lambada, ...)
    eval_protocol = "paper"   # or "sliding"
    runs = [dict(name="vl-norm B2x2", mlp="kron", kron_b_shape=(2, 2), kron_init="vl-norm"),
            dict(name="scratch B2x2", mlp="kron", kron_b_shape=(2, 2), init_from="scratch")]
    max_iters = 2000          # every other assignment is a train.py key applied to every run

A run without init_from starts from the teacher; "teacher" as the value of init_from or distill_from
names it too. `--key=value` overrides a study key, or a train.py key of every run and of a teacher
the study trains: the command line wins over the study file, the runs' and the teacher's own keys
included (`--max_iters=20` gives every run and the teacher 20 steps).

Progress: a line as each run starts and ends, its evaluations, and after each run the ETA of the
runs left (their steps at the mean time per step of the runs trained so far).

Output, in out_dir: one directory per run (its checkpoints, run.json, loss.png, eval.json and
train.log, the full log of its training), and
  study.json  one record per run, the teacher first: name, keys, num_params (tied embedding once, with
              position embeddings), val_loss_start (right after compression), val_loss (of the best
              checkpoint, the one evaluated), curve ([tokens, val_loss] at every evaluation), eval
              (eval_ppl.py's records), tokens, train_seconds, tokens_per_s, status
  study.md    the same as a table, sorted by parameter count, the teacher first
  study.png   three panels, with one legend below them (each run its own colour, marker and line
              style) and a title naming the study file and the command line's overrides:
              1. validation loss against tokens trained, every run from right after compression on
                 (the teacher's final loss a dotted line)
              2. final perplexity (log axis) against parameter count, the teacher a star; runs of
                 one size are moved sideways where they would cover each other
              3. the runs ranked by final perplexity (log axis), each value written beside its point,
                 the teacher a dotted line
              Perplexity: eval_ppl.py's on the first evaluation set (the study's val.bin).
              `--replot STUDY_JSON [--title TITLE] [--out PNG]` draws it again from a study.json.

Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint (train.py does
that by itself with the same command), and a run whose keys changed since it ran is an error that
names it. A failing run is reported and the others go on (an evaluation that fails counts; the
exit code is then 1). Every key, eval_datasets and eval_data_files included, is checked first.
"""
from __future__ import annotations

import storage  # first: stdlib only, so that Ctrl-C while torch loads is one line

if __name__ == "__main__":
    storage.exit_quietly_on_ctrl_c(code=1)          # the exit code of its Ctrl-C during the run

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import torch

from config import (ConfigError, TrainConfig, TrainError, config_diff, config_from, format_diff,
                    load_config_file, parse_override, to_overrides)
from checkpoints import CKPT_BEST, CKPT_LAST, RUN_JSON, load_checkpoint, resolve_model, source_spec
from compress import build
from data import EVAL_DATASETS
from plots import plot
from runtime import format_duration

REPO = os.path.dirname(os.path.abspath(__file__))
CLI = "the command line"       # where an override was set
STUDY_KEYS = {"teacher": None, "data_dir": "data/openwebtext", "out_dir": "out-study", "eval_data_files": [],
              "eval_datasets": [], "eval_protocol": "paper", "runs": []}
TEACHER = "teacher"            # the placeholder runs use for the study's teacher


class StudyError(TrainError):
    """A study file that cannot run; printed without a traceback."""


# -----------------------------------------------------------------------------
# The plan: every run resolved to the train.py config it will run with

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def load_study(path: str, overrides: list[str]) -> tuple[dict, list[tuple[str, object, str]]]:
    """The study keys, and the train.py keys every run gets (with where each was set)."""
    values = load_config_file(path)
    pairs = [(k, v, path) for k, v in values.items()] + [(*parse_override(a), CLI) for a in overrides]
    study, common = dict(STUDY_KEYS), []
    for k, v, where in pairs:
        if k in STUDY_KEYS:
            study[k] = v
        if k not in STUDY_KEYS or k == "data_dir":  # a run's out_dir is its own directory of the study
            common.append((k, v, where))
    if study["teacher"] is None:
        raise StudyError(f"{path} sets no teacher (a model name or path, or a dict of train.py keys with a 'name')")
    if not isinstance(study["runs"], (list, tuple)) or not study["runs"]:
        raise StudyError(f"{path}: runs must be a non-empty list of dicts, each with a 'name' and train.py keys")
    if study["eval_protocol"] not in ("paper", "sliding"):
        raise StudyError(f"eval_protocol={study['eval_protocol']!r}; choose 'paper' or 'sliding'")
    for k in ("eval_data_files", "eval_datasets"):
        if not isinstance(study[k], (list, tuple)):
            raise StudyError(f"{k}={study[k]!r} must be a list")
    # what eval_ppl.py would refuse after every run has trained: refused now
    unknown = [d for d in study["eval_datasets"] if not isinstance(d, str) or d not in EVAL_DATASETS]
    if unknown:
        raise StudyError(f"eval_datasets: unknown data set(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(EVAL_DATASETS)}, or score a local file with eval_data_files")
    missing = [f for f in study["eval_data_files"] if not isinstance(f, str) or not os.path.isfile(f)]
    if missing:
        raise StudyError(f"eval_data_files: no such file {', '.join(map(repr, missing))}")
    return study, common


def plan_runs(study: dict, common: list, path: str) -> tuple[dict | None, list[dict]]:
    """The teacher run (None for a given model) and every run: name, keys, directory, TrainConfig."""
    out = study["out_dir"]
    teacher = study["teacher"]
    plans, dirs = [], set()
    entries = list(study["runs"])
    teacher_plan = None
    if isinstance(teacher, dict):
        entries = [{"name": teacher.get("name", TEACHER), **teacher, "_teacher": True}] + entries
        teacher_path = os.path.join(out, slug(entries[0]["name"]))
    else:
        try:
            resolve_model(str(teacher))
        except FileNotFoundError as e:
            raise StudyError(f"teacher={teacher!r} cannot be loaded: {e}") from None
        teacher_path = str(teacher)
        dirs.add(slug(TEACHER))         # where the given teacher is measured
    for run in entries:
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or not run["name"]:
            raise StudyError(f"{path}: every run is a dict with a 'name', got {run!r}")
        name, is_teacher = run["name"], run.get("_teacher", False)
        given = {k: v for k, v in run.items() if k not in ("name", "_teacher")}
        if slug(name) in dirs:
            raise StudyError(f"{path}: the run name {name!r} is used twice (names must differ, also as directories"
                             + ("; 'teacher' is the given teacher's)" if slug(name) == slug(TEACHER) else ")"))
        dirs.add(slug(name))
        run_dir = os.path.join(out, slug(name))
        keys = dict(given)
        if not is_teacher:
            keys.setdefault("init_from", TEACHER)
        # the study file's keys, then the run's own, then the command line's: `--max_iters=20` is the
        # budget of every run and of the teacher, whatever the file sets for them
        sources = ([s for s in common if s[2] != CLI] + [(k, v, f"run {name!r}") for k, v in keys.items()]
                   + [s for s in common if s[2] == CLI])
        if not is_teacher:
            sources = [(k, teacher_path if k in ("init_from", "distill_from") and v == TEACHER else v, where)
                       for k, v, where in sources]
        sources += [("out_dir", run_dir, "the study"), ("eval_at_start", True, "the study")]
        try:
            cfg = config_from(sources)
        except ConfigError as e:
            raise StudyError(f"run {name!r}: {e}") from None
        plan = {"name": name, "keys": given, "dir": run_dir, "cfg": cfg, "teacher_path": teacher_path}
        if is_teacher:
            teacher_plan = plan
        else:
            plans.append(plan)
    return teacher_plan, plans


def changed_runs(plans: list[dict]) -> list[str]:
    """Runs whose directory holds a run of other keys than the study now gives them."""
    changed = []
    for p in plans:
        stored = stored_config(p["dir"])
        if stored is not None:
            diff = config_diff(stored, p["cfg"].flat())
            if diff:
                changed.append(f"{p['name']!r} ({p['dir']}): {format_diff(diff)}")
    return changed


def stored_config(run_dir: str) -> dict | None:
    """The config a run directory was trained with: from run.json, else its last checkpoint."""
    summary = read_json(os.path.join(run_dir, RUN_JSON))
    if summary is not None:
        return summary["config"]
    for name in (CKPT_LAST, CKPT_BEST):      # the checkpoint train.py resumes from
        ckpt = os.path.join(run_dir, name)
        if os.path.isfile(ckpt):
            try:
                return load_checkpoint(ckpt, mmap=True).get("config")
            except Exception:
                return None     # unreadable: train.py reports it when the run is resumed
    return None


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def planned_sizes(teacher_plan: dict | None, plans: list[dict], teacher: str | dict) -> dict[str, int | None]:
    """Parameters of the model every run trains (built on the meta device), checking each run's
    compression keys against the teacher's matrices before anything is trained."""
    if teacher_plan is not None:
        config, spec = teacher_plan["cfg"].model_spec()
        teacher_spec = (config, spec.keys)
    else:
        try:
            teacher_spec = source_spec(str(teacher))
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise StudyError(f"teacher={teacher!r} cannot be loaded: {e}") from None
    sizes = {}
    for p in ([teacher_plan] if teacher_plan else []) + plans:
        cfg = p["cfg"]
        from_teacher = p is not teacher_plan and cfg.init_from == p["teacher_path"]
        try:
            resolved = cfg.model_spec(teacher_spec) if from_teacher and teacher_spec else cfg.model_spec()
        except (ConfigError, FileNotFoundError) as e:
            raise StudyError(f"run {p['name']!r}: {e}") from None
        if resolved is None:
            sizes[p["name"]] = None
            continue
        with torch.device("meta"):
            sizes[p["name"]] = build(*resolved).num_params()
    return sizes


# -----------------------------------------------------------------------------
# Running train.py and eval_ppl.py

def _die_with_parent() -> None:
    """In the child: end when the study ends, however it ends (Linux), so a killed study leaves no
    training process behind holding its run directory."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_logged(cmd: list[str], log_path: str, echo) -> int:
    """Run cmd, its output appended to log_path; `echo` sees each line (progress). Returns the exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", buffering=1) as log:          # line by line: `tail -f` shows progress
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, preexec_fn=_die_with_parent if os.name == "posix" else None,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in proc.stdout:
                log.write(line)
                echo(line.rstrip("\n"))
        finally:
            code = proc.wait()
    return code


def tail(path: str, n: int = 3) -> str:
    try:
        with open(path) as f:
            lines = [l.strip() for l in f if l.strip()]
        return " | ".join(lines[-n:])
    except OSError:
        return ""


def train_run(plan: dict, index: str, echo) -> dict:
    """Train one run unless it is finished; returns its run.json summary (or a failure)."""
    summary = read_json(os.path.join(plan["dir"], RUN_JSON))
    if summary and summary.get("finished") and not config_diff(summary["config"], plan["cfg"].flat()):
        print(f"{index} {plan['name']}: finished earlier, skipped", flush=True)
        return {"status": "ok", "skipped": True, **summary}
    log_path = os.path.join(plan["dir"], "train.log")
    print(f"{index} {plan['name']}: training (log: {log_path})", flush=True)
    t0 = time.time()
    code = run_logged([sys.executable, os.path.join(REPO, "train.py"), *to_overrides(plan["cfg"])], log_path,
                      lambda line: echo(f"{index} {plan['name']}: {line}") if line.startswith("eval iter") else None)
    summary = read_json(os.path.join(plan["dir"], RUN_JSON))
    if code != 0 or not summary or not summary.get("finished"):
        return {"status": f"failed (exit {code}): {tail(log_path)}"}
    print(f"{index} {plan['name']}: done in {time.time() - t0:.0f} s, best val loss {summary['best_val_loss']:.4f}",
          flush=True)
    return {"status": "ok", **summary}


def evaluate(model: str, out_json: str, study: dict, device: str, log_path: str, stamp: str | None) -> list | None:
    """eval_ppl.py's records for `model` on the study's evaluation sets (cached in out_json)."""
    cached = read_json(out_json)
    if isinstance(cached, dict) and cached.get("stamp") == stamp and stamp is not None:
        return cached["records"]
    files = [os.path.join(study["data_dir"], "val.bin"), *study["eval_data_files"]]
    cmd = [sys.executable, os.path.join(REPO, "eval_ppl.py"), "--model", model, "--protocol", study["eval_protocol"],
           "--device", device, "--out", out_json + ".records"]
    for f in files:
        cmd += ["--data_file", f]
    cmd += ["--datasets", ",".join(study["eval_datasets"])]
    code = run_logged(cmd, log_path, lambda line: None)
    records = read_json(out_json + ".records")
    if code != 0 or records is None:
        return None
    storage.write_json({"stamp": stamp, "records": records}, out_json)
    os.remove(out_json + ".records")
    return records


def checkpoint_stamp(run_dir: str) -> str | None:
    """What identifies the evaluated checkpoint (its size and time): a new one is evaluated again."""
    path = os.path.join(run_dir, CKPT_BEST)
    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


# -----------------------------------------------------------------------------
# Records, table, plot

def record(name: str, keys, summary: dict, evals: list | None, teacher: bool = False) -> dict:
    history = summary.get("history") or []
    curve = [[h["tokens"], h["val"]] for h in history]
    best = summary.get("best_val_loss")
    if best is None or not math.isfinite(best):            # no training step: the one evaluation
        best = history[-1]["val"] if history else None
    return {"name": name, "keys": keys, "status": summary.get("status", "ok"),
            "num_params": summary.get("num_params"), "num_params_no_wpe": summary.get("num_params_no_wpe"),
            "val_loss_start": best if teacher else (history[0]["val"] if history else None),
            "val_loss": best, "curve": [] if teacher and not summary.get("iter_num") else curve,
            "eval": evals or [], "tokens": summary.get("tokens", 0), "train_seconds": summary.get("train_seconds"),
            "tokens_per_s": summary.get("tokens_per_s"), "dir": summary.get("out_dir")}


def markdown(records: list[dict]) -> str:
    sets = []
    for r in records:
        for e in r["eval"]:
            if e["dataset"] not in sets:
                sets.append(e["dataset"])
    label = {s: os.path.basename(s) for s in sets}
    head = (["run", "params", "val loss after compression", "final val loss"]
            + [f"ppl {label[s]}" for s in sets] + ["tokens", "train time", "tokens/s", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, f: "" if v is None else format(v, f)
    for r in records:
        ppl = {e["dataset"]: e["ppl"] for e in r["eval"]}
        cells = [r["name"], fmt(r["num_params"], ","), fmt(r["val_loss_start"], ".4f"), fmt(r["val_loss"], ".4f")]
        cells += [fmt(ppl.get(s), ".2f") for s in sets]
        cells += [fmt(r["tokens"], ","), "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s",
                  fmt(r["tokens_per_s"], ",.0f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordered(records: list[dict]) -> list[dict]:
    """The teacher first, then the runs by parameter count: the order of the table, plot and legend."""
    return [records[0]] + sorted(records[1:], key=lambda r: (r["num_params"] or 0, r["name"]))


# -----------------------------------------------------------------------------

def run_study(path: str, overrides: list[str]) -> list[dict]:
    study, common = load_study(path, overrides)
    teacher_plan, plans = plan_runs(study, common, path)
    sizes = planned_sizes(teacher_plan, plans, study["teacher"])
    everything = ([teacher_plan] if teacher_plan else []) + plans
    changed = changed_runs(everything)
    if changed:
        raise StudyError("these runs were made with other keys than the study now gives them: " + "; ".join(changed)
                         + ". Delete their directories to redo them, or give the changed runs new names")
    out = study["out_dir"]
    os.makedirs(out, exist_ok=True)
    print(f"study {path}: teacher {teacher_plan['name'] if teacher_plan else study['teacher']}, {len(plans)} runs, "
          f"output in {out}")
    for p in everything:
        size = sizes.get(p["name"])
        print(f"  {p['name']:<32} {'?' if size is None else format(size, ','):>14} parameters  {p['dir']}")
    title = " ".join([f"study {path}", *overrides])     # the plot says what it shows
    with storage.RunLock(out):           # one study per directory
        return _run(study, teacher_plan, plans, path, title)


def _run(study: dict, teacher_plan: dict | None, plans: list[dict], path: str, title: str) -> list[dict]:
    out, device = study["out_dir"], (teacher_plan or plans[0])["cfg"].device
    n = len(plans) + 1
    t_start = time.time()
    echo = lambda line: print("    " + line, flush=True)
    eta = Eta([p["cfg"].max_iters for p in ([teacher_plan] if teacher_plan else []) + plans])
    # 1. the teacher: trained here, or a given model measured on the study's data
    if teacher_plan:
        eta.start()
        summary = train_run(teacher_plan, f"[1/{n}]", echo)
        teacher_dir = teacher_plan["dir"]
        teacher_keys, teacher_model = teacher_plan["keys"], teacher_dir
    else:
        teacher_dir = os.path.join(out, TEACHER)
        probe = dict(plans[0], name=TEACHER, dir=teacher_dir)
        probe["cfg"] = config_from([(k, v, "teacher") for k, v in _teacher_probe(plans[0]["cfg"], study).items()])
        summary = train_run(probe, f"[1/{n}]", echo)
        teacher_keys, teacher_model = study["teacher"], str(study["teacher"])
    if summary["status"] != "ok":
        raise StudyError(f"the teacher failed, so no run can start from it: {summary['status']}")
    evals = evaluate(teacher_model, os.path.join(teacher_dir, "eval.json"), study, device,
                     os.path.join(teacher_dir, "eval.log"), checkpoint_stamp(teacher_dir) or str(teacher_model))
    if evals is None:
        summary["status"] = f"evaluation failed: {tail(os.path.join(teacher_dir, 'eval.log'))}"
        print(f"[1/{n}] {TEACHER}: {summary['status']}", flush=True)
    records = [record(TEACHER, teacher_keys, summary, evals, teacher=True)]
    if teacher_plan:
        eta.done(not summary.get("skipped"), f"[1/{n}]")
    # 2. the runs
    for i, plan in enumerate(plans, 2):
        index = f"[{i}/{n}]"
        eta.start()
        summary = train_run(plan, index, echo)
        evals = None
        if summary["status"] == "ok":
            evals = evaluate(plan["dir"], os.path.join(plan["dir"], "eval.json"), study, device,
                             os.path.join(plan["dir"], "eval.log"), checkpoint_stamp(plan["dir"]))
            if evals is None:
                summary["status"] = f"evaluation failed: {tail(os.path.join(plan['dir'], 'eval.log'))}"
        else:
            print(f"{index} {plan['name']}: {summary['status']}", flush=True)
        records.append(record(plan["name"], plan["keys"], summary, evals))
        write_outputs(records, study, path, time.time() - t_start, title)   # the results so far (all, after the last)
        eta.done(summary["status"] == "ok" and not summary.get("skipped"), index)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    print(f"study done in {(time.time() - t_start) / 60:.1f} min: {out}/study.md, study.json, study.png"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return records


class Eta:
    """The time the study's remaining runs will take: their steps at the mean wall time per step
    (training and evaluation) of the runs trained so far in this invocation."""

    def __init__(self, steps: list[int]):
        self.steps, self.index, self.seconds, self.trained = steps, 0, 0.0, 0

    def start(self) -> None:
        self.t0 = time.time()

    def done(self, trained: bool, index: str) -> None:
        """After run number self.index: count its time if it was trained (not skipped, not failed)."""
        if trained:
            self.seconds += time.time() - self.t0
            self.trained += self.steps[self.index]
        self.index += 1
        left = self.steps[self.index:]
        if left and self.trained:
            eta = self.seconds / self.trained * sum(left)
            print(f"{index} {len(left)} run(s) left, ETA {format_duration(eta)}", flush=True)


def _teacher_probe(cfg: TrainConfig, study: dict) -> dict:
    """train.py keys that measure a given teacher on the study's data without training it."""
    keys = {k: getattr(cfg, k) for k in ("data_dir", "data_prepare", "batch_size", "block_size", "eval_iters", "seed",
                                          "device", "dtype")}
    return {**keys, "init_from": str(study["teacher"]), "out_dir": os.path.join(study["out_dir"], TEACHER),
            "max_iters": 0, "eval_at_start": True}


def write_outputs(records: list[dict], study: dict, path: str, seconds: float, title: str) -> None:
    out = study["out_dir"]
    order = ordered(records)
    storage.write_json(records, os.path.join(out, "study.json"))
    trained = sum(r["train_seconds"] or 0 for r in records)
    text = (f"# Study {os.path.basename(path)}\n\n" + markdown(order) + "\n\n"
            f"val loss: train.py's estimate on val.bin (eval_iters batches, the same for every run); ppl: "
            f"eval_ppl.py, {study['eval_protocol']} protocol, best checkpoint of each run. Training steps of all "
            f"runs: {trained / 60:.1f} min; this invocation of study.py: {seconds / 60:.1f} min.\n")
    storage.atomic_write(os.path.join(out, "study.md"), lambda f: f.write(text.encode()))
    try:
        plot(order, os.path.join(out, "study.png"), title)
    except ImportError:
        print("note: no matplotlib, so no study.png (pip install matplotlib)", file=sys.stderr)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("config", nargs="?", help="study file (Python assignments), e.g. configs/study_mini.py")
    p.add_argument("overrides", nargs="*", metavar="--key=value",
                   help="override a study key, or a train.py key of every run and of the teacher")
    p.add_argument("--replot", metavar="STUDY_JSON",
                   help="instead of running a study: draw study.png again from STUDY_JSON (a study's study.json) "
                        "and exit; nothing is trained")
    p.add_argument("--title", help="with --replot: the plot's title (default: 'study STUDY_JSON')")
    p.add_argument("--out", metavar="PNG", help="with --replot: where to write the plot (default: STUDY_JSON with "
                                                ".png for .json, e.g. out-study-mini/study.png)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or not argv:
        p.parse_args(argv or ["--help"])
    if argv[0].split("=")[0] == "--replot":
        args = p.parse_args(argv)
        replot(args.replot, args.out or os.path.splitext(args.replot)[0] + ".png", args.title or f"study {args.replot}")
        return read_json(args.replot)
    return run_study(argv[0], argv[1:])


def replot(study_json: str, png: str, title: str) -> None:
    """study.png again from a study.json, with this version's plot."""
    if not os.path.isfile(study_json):
        raise StudyError(f"--replot {study_json}: no such file")
    records = read_json(study_json)
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "curve" in r for r in records):
        raise StudyError(f"{study_json} is not a study.json (a list of run records, the teacher first)")
    plot(ordered(records), png, title)
    print(f"wrote {png}")


if __name__ == "__main__":
    storage.restore_ctrl_c()
    try:
        records = main()
        if any(r["status"] != "ok" for r in records):
            sys.exit(1)         # the table is written; the summary line above names the failed runs
    except (TrainError, FileNotFoundError, storage.DirectoryLocked, storage.DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("interrupted; finished runs are kept and the current one resumes: run the same command again")
