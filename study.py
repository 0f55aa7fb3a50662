"""
A study: one teacher, one data directory, one training budget, and a grid of compression setups
started from the teacher, each trained by train.py and evaluated by eval_ppl.py (the same code
paths a user runs), compared in one table and one plot.

    python study.py configs/study_mini.py                    # a 2-core laptop, offline, under an hour
    python study.py configs/study_gpt2.py                    # the paper's grid, on a GPU
    python study.py configs/study_mini.py --max_iters=20 --out_dir=out-study-smoke

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
names it too. `--key=value` overrides a study key or a train.py key of every run.

Output, in out_dir: one directory per run (its checkpoints, run.json, eval.json and train.log, the
full log of its training), and
  study.json  one record per run, the teacher first: name, keys, num_params (tied embedding once, with
              position embeddings), val_loss_start (right after compression), val_loss (of the best
              checkpoint, the one evaluated), curve ([tokens, val_loss] at every evaluation), eval
              (eval_ppl.py's records), tokens, train_seconds, tokens_per_s, status
  study.md    the same as a table, sorted by parameter count, the teacher first
  study.png   validation loss against tokens for every run (the teacher a horizontal line), and
              final perplexity against parameter count

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
from data import EVAL_DATASETS
from model import GPT, load_checkpoint, resolve_model, source_config

REPO = os.path.dirname(os.path.abspath(__file__))
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
    pairs = [(k, v, path) for k, v in values.items()] + [(*parse_override(a), "the command line") for a in overrides]
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
            keys = {k: (teacher_path if k in ("init_from", "distill_from") and v == TEACHER else v)
                    for k, v in keys.items()}
        sources = common + [(k, v, f"run {name!r}") for k, v in keys.items()]
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
    summary = read_json(os.path.join(run_dir, "run.json"))
    if summary is not None:
        return summary["config"]
    for name in ("ckpt_last.pt", "ckpt_best.pt"):      # the checkpoint train.py resumes from
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
        teacher_config = teacher_plan["cfg"].model_config()
    else:
        try:
            teacher_config = source_config(str(teacher))
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise StudyError(f"teacher={teacher!r} cannot be loaded: {e}") from None
    sizes = {}
    for p in ([teacher_plan] if teacher_plan else []) + plans:
        cfg = p["cfg"]
        from_teacher = p is not teacher_plan and cfg.init_from == p["teacher_path"]
        try:
            config = cfg.model_config(teacher_config) if from_teacher and teacher_config else cfg.model_config()
        except (ConfigError, FileNotFoundError) as e:
            raise StudyError(f"run {p['name']!r}: {e}") from None
        if config is None:
            sizes[p["name"]] = None
            continue
        with torch.device("meta"):
            sizes[p["name"]] = GPT(config).num_params()
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
    summary = read_json(os.path.join(plan["dir"], "run.json"))
    if summary and summary.get("finished") and not config_diff(summary["config"], plan["cfg"].flat()):
        print(f"{index} {plan['name']}: finished earlier, skipped", flush=True)
        return {"status": "ok", **summary}
    log_path = os.path.join(plan["dir"], "train.log")
    print(f"{index} {plan['name']}: training (log: {log_path})", flush=True)
    t0 = time.time()
    code = run_logged([sys.executable, os.path.join(REPO, "train.py"), *to_overrides(plan["cfg"])], log_path,
                      lambda line: echo(f"{index} {plan['name']}: {line}") if line.startswith("eval iter") else None)
    summary = read_json(os.path.join(plan["dir"], "run.json"))
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
        cmd += ["--data-file", f]
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
    path = os.path.join(run_dir, "ckpt_best.pt")
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


def plot(records: list[dict], path: str, title: str) -> None:
    """Three panels: validation loss against tokens (the teacher a horizontal line), final perplexity
    against parameter count, and the runs ranked by final perplexity (the differences at a glance)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    teacher, runs = records[0], records[1:]
    colors = plt.get_cmap("tab10").colors
    style = {r["name"]: (colors[i % 10], "-" if i < 10 else "--") for i, r in enumerate(runs)}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 6), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for r in runs:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            color, line = style[r["name"]]
            ax1.plot(xs, ys, line, marker=".", color=color, label=r["name"])
    if teacher["val_loss"] is not None:
        ax1.axhline(teacher["val_loss"], color="black", linestyle=":", label=f"teacher ({teacher['val_loss']:.3f})")
    ends = [r["curve"][-1][1] for r in runs if r["curve"]]
    if ends:          # the loss right after compression can be far above the rest: show the recovery
        lo = min(ends + ([teacher["val_loss"]] if teacher["val_loss"] else []))
        ax1.set_ylim(lo - 0.1, max(ends) + 1.5 * (max(ends) - lo) + 0.2)
    ax1.set(xlabel="tokens trained", ylabel="validation loss", title="validation loss during recovery")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.grid(alpha=0.3)
    main_set = next((e["dataset"] for r in records for e in r["eval"]), None)
    ppl = {r["name"]: next((e["ppl"] for e in r["eval"] if e["dataset"] == main_set), None) for r in records}
    done = [r for r in runs if ppl[r["name"]] is not None and r["num_params"]]
    if done:
        values = sorted(ppl[r["name"]] for r in done)
        top = values[len(values) // 2] * 1.5               # the zoomed range; higher ones are marked at the top
        above = 0
        for r in done:
            color, _ = style[r["name"]]
            y = min(ppl[r["name"]], top)
            ax2.scatter(r["num_params"] / 1e6, y, color=color, marker="^" if y < ppl[r["name"]] else "o", s=45)
            if y < ppl[r["name"]]:
                above += 1
                ax2.annotate(f"{r['name']}: {ppl[r['name']]:.0f}", (r["num_params"] / 1e6, y),
                             xytext=(6, -10 * above), textcoords="offset points", fontsize=7)
        if ppl[teacher["name"]] and teacher["num_params"]:
            ax2.scatter(teacher["num_params"] / 1e6, ppl[teacher["name"]], color="black", marker="*", s=120)
            ax2.annotate("teacher", (teacher["num_params"] / 1e6, ppl[teacher["name"]]), xytext=(5, 3),
                         textcoords="offset points", fontsize=8)
        ax2.set_ylim(min(values + [ppl[teacher["name"]] or values[0]]) * 0.97, top * 1.03)
        ranked = sorted(done, key=lambda r: ppl[r["name"]])
        for i, r in enumerate(ranked):
            ax3.scatter(ppl[r["name"]], i, color=style[r["name"]][0], s=45)
            ax3.annotate(f"{ppl[r['name']]:.1f}", (ppl[r["name"]], i), xytext=(6, -3), textcoords="offset points",
                         fontsize=7)
        ax3.set_yticks(range(len(ranked)), [f"{r['name']} ({r['num_params'] / 1e6:.2f}M)" for r in ranked], fontsize=7)
        if ppl[teacher["name"]]:
            ax3.axvline(ppl[teacher["name"]], color="black", linestyle=":", label="teacher")
        ax3.set_xscale("log")
        ax3.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax3.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax3.invert_yaxis()
    where = os.path.basename(main_set) if main_set else "?"
    ax2.set(xlabel="parameters (millions; tied embedding once, with position embeddings)",
            ylabel=f"perplexity on {where}", title="final perplexity against size")
    ax3.set(xlabel=f"perplexity on {where} (log scale)", title="runs ranked by final perplexity")
    for ax in (ax2, ax3):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    with storage.RunLock(out):           # one study per directory
        return _run(study, teacher_plan, plans, path)


def _run(study: dict, teacher_plan: dict | None, plans: list[dict], path: str) -> list[dict]:
    out, device = study["out_dir"], (teacher_plan or plans[0])["cfg"].device
    n = len(plans) + 1
    t_start = time.time()
    echo = lambda line: print("    " + line, flush=True)
    # 1. the teacher: trained here, or a given model measured on the study's data
    if teacher_plan:
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
    # 2. the runs
    for i, plan in enumerate(plans, 2):
        index = f"[{i}/{n}]"
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
        write_outputs(records, study, path, time.time() - t_start)      # the results so far (all, after the last)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    print(f"study done in {(time.time() - t_start) / 60:.1f} min: {out}/study.md, study.json, study.png"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return records


def _teacher_probe(cfg: TrainConfig, study: dict) -> dict:
    """train.py keys that measure a given teacher on the study's data without training it."""
    keys = {k: getattr(cfg, k) for k in ("data_dir", "data_prepare", "batch_size", "block_size", "eval_iters", "seed",
                                          "device", "dtype")}
    return {**keys, "init_from": str(study["teacher"]), "out_dir": os.path.join(study["out_dir"], TEACHER),
            "max_iters": 0, "eval_at_start": True}


def write_outputs(records: list[dict], study: dict, path: str, seconds: float) -> None:
    out = study["out_dir"]
    order = [records[0]] + sorted(records[1:], key=lambda r: (r["num_params"] or 0, r["name"]))
    storage.write_json(records, os.path.join(out, "study.json"))
    trained = sum(r["train_seconds"] or 0 for r in records)
    text = (f"# Study {os.path.basename(path)}\n\n" + markdown(order) + "\n\n"
            f"val loss: train.py's estimate on val.bin (eval_iters batches, the same for every run); ppl: "
            f"eval_ppl.py, {study['eval_protocol']} protocol, best checkpoint of each run. Training steps of all "
            f"runs: {trained / 60:.1f} min; this invocation of study.py: {seconds / 60:.1f} min.\n")
    storage.atomic_write(os.path.join(out, "study.md"), lambda f: f.write(text.encode()))
    try:
        plot(order, os.path.join(out, "study.png"), f"study {os.path.basename(path)}")
    except ImportError:
        print("note: no matplotlib, so no study.png (pip install matplotlib)", file=sys.stderr)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("config", help="study file (Python assignments), e.g. configs/study_mini.py")
    p.add_argument("overrides", nargs="*", metavar="--key=value", help="override a study key or a train.py key")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or not argv:
        p.parse_args(argv or ["--help"])
    return run_study(argv[0], argv[1:])


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
