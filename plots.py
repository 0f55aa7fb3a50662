"""
The pictures: a training run's loss curve (train.py's loss.png) and a study's three panels
(study.py's study.png). Figures are drawn on a bare matplotlib Figure (Agg: no display, no pyplot
state) and written atomically.
"""
from __future__ import annotations

import math
import os

import storage


def write_loss_plot(curve: list[dict], history: list[dict], path: str, title: str) -> None:
    """A PNG of the training loss at every log step (a line) and the evaluations' train and val
    losses (markers) against tokens; every point inside the axes. ImportError without matplotlib."""
    # a bare Figure draws with Agg, needs no display and leaves pyplot's global state alone
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if curve:
        ax.plot([c["tokens"] for c in curve], [c["loss"] for c in curve], color="tab:blue", lw=0.8, alpha=0.6,
                label="train loss (each log step)")
    if history:
        tokens = [h["tokens"] for h in history]
        ax.plot(tokens, [h["train"] for h in history], "s--", color="tab:blue", ms=4, label="train loss (evaluation)")
        ax.plot(tokens, [h["val"] for h in history], "o-", color="tab:orange", ms=4, label="val loss (evaluation)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))     # 250k, 1.5M, 2G tokens
    ax.set(xlabel="tokens trained", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    if curve or history:
        ax.legend(loc="upper right")
    fig.tight_layout()
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# Every run's (colour, marker, line style): tab20's 20 colours (its dark shades first, then the light
# ones), 9 markers and 4 line styles, each cycling with the run's index: in a study of up to 180 runs
# no two share all three, and consecutive runs differ in all three.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
LINES = ("-", "--", "-.", ":")
MARKER_POINTS = 7.5             # the width of a plotted point, in points


def run_styles(names: list[str]) -> dict[str, tuple]:
    import matplotlib
    tab20 = matplotlib.colormaps["tab20"].colors
    colors = tab20[0::2] + tab20[1::2]
    return {name: (colors[i % len(colors)], MARKERS[i % len(MARKERS)], LINES[i % len(LINES)])
            for i, name in enumerate(names)}


def label_log_axis(axis, lo: float, hi: float) -> None:
    """Plain-number tick labels on a log axis from lo to hi, also when it spans less than a decade
    (where matplotlib would label one tick, or none)."""
    import matplotlib.ticker as mt
    ticks = [t for t in mt.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)).tick_values(lo, hi) if lo <= t <= hi]
    if len(ticks) < 3:
        ticks = [t for t in mt.MaxNLocator(5).tick_values(lo, hi) if lo <= t <= hi]
    axis.set_major_locator(mt.FixedLocator(ticks))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mt.NullFormatter())


def main_dataset(records: list[dict]) -> str | None:
    """The evaluation set the perplexity panels show: the first one evaluated (the study's val.bin)."""
    return next((e["dataset"] for r in records for e in r["eval"]), None)


def figure(records: list[dict], title: str):
    """The study plot (a matplotlib Figure; records: the teacher first, then the runs in legend order).
    Three panels: validation loss against tokens trained (the teacher a horizontal line), final
    perplexity against parameter count, and the runs ranked by final perplexity (the differences at a
    glance). One legend below them serves all three: each run has its own colour, marker and line style."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter
    from matplotlib.transforms import offset_copy
    teacher, runs = records[0], records[1:]
    styles = run_styles([r["name"] for r in runs])
    main_set = main_dataset(records)
    ppl = {r["name"]: next((e["ppl"] for e in r["eval"] if e["dataset"] == main_set), None) for r in records}
    t_ppl, t_loss = ppl[teacher["name"]], teacher["val_loss"]
    millions = lambda r: f"{r['num_params'] / 1e6:.2f}M" if r["num_params"] else "? parameters"

    handles = [Line2D([], [], color=c, marker=m, linestyle=ls, ms=6,
                      label=f"{r['name']} ({millions(r)})" + ("" if r["status"] == "ok" else " - failed"))
               for r in runs for c, m, ls in [styles[r["name"]]]]
    handles.append(Line2D([], [], color="black", linestyle=":", marker="*", ms=10, label=f"teacher ({millions(teacher)}"
                          + (f", val loss {t_loss:.3f})" if t_loss is not None else ")")))
    ncol = min(5, len(handles))
    rows = -(-len(handles) // ncol)
    # the panels keep their height whatever the legend's; constrained layout fits the long run names
    fig = Figure(figsize=(21, 6.0 + 0.25 * rows), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])

    # 1. validation loss against tokens: every point inside the axes (the loss right after compression
    # can be far above the rest; the ranked panel shows the final differences)
    for r in runs:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            color, marker, line = styles[r["name"]]
            ax1.plot(xs, ys, linestyle=line, marker=marker, color=color, ms=5, lw=1.3)
    if t_loss is not None:
        ax1.axhline(t_loss, color="black", linestyle=":", lw=1.5)
    ax1.xaxis.set_major_formatter(EngFormatter(sep=""))           # 100k, 1.5M, 2G tokens
    ax1.set(xlabel="tokens trained", ylabel="validation loss (train.py's estimate)",
            title="validation loss during recovery")

    # 2. final perplexity against size, on a log axis so that every run is inside it (the points are
    # placed at the end, once the layout fixes the axes' size)
    done = [r for r in runs if ppl[r["name"]] is not None and r["num_params"]]
    values = [ppl[r["name"]] for r in done] + ([t_ppl] if t_ppl and teacher["num_params"] else [])
    where = os.path.basename(main_set) if main_set else "?"
    if values:
        if t_ppl and teacher["num_params"]:
            ax2.scatter([teacher["num_params"] / 1e6], [t_ppl], color="black", marker="*", s=160, zorder=3)
            ax2.annotate("teacher", (teacher["num_params"] / 1e6, t_ppl), xytext=(6, 4), textcoords="offset points",
                         fontsize=8)
        lo, hi = min(values) / 1.06, max(values) * 1.06
        ax2.set_yscale("log")
        ax2.set_ylim(lo, hi)
        label_log_axis(ax2.yaxis, lo, hi)
        sizes = [r["num_params"] / 1e6 for r in done] + ([teacher["num_params"] / 1e6] if teacher["num_params"] else [])
        pad = 0.12 * (max(sizes) - min(sizes)) or 0.05 * max(sizes)  # room for the sideways spread
        ax2.set_xlim(min(sizes) - pad, max(sizes) + pad)
    ax2.set(xlabel="parameters (millions; tied embedding once, with position embeddings)\n"
                   "runs of the same size are spread sideways where they would hide each other",
            ylabel=f"perplexity on {where} (log scale)", title="final perplexity against size")

    # 3. the runs ranked by final perplexity, best at the top, each value written beside its point
    if done:
        ranked = sorted(done, key=lambda r: ppl[r["name"]])
        for i, r in enumerate(ranked):
            color, marker, _ = styles[r["name"]]
            ax3.scatter([ppl[r["name"]]], [i], color=color, marker=marker, s=MARKER_POINTS ** 2, edgecolors="black",
                        linewidths=0.4, zorder=3)
            ax3.annotate(f"{ppl[r['name']]:.1f}", (ppl[r["name"]], i), xytext=(7, -3), textcoords="offset points",
                         fontsize=8)
        ax3.set_yticks(range(len(ranked)), [f"{r['name']} ({millions(r)})" for r in ranked], fontsize=8)
        if t_ppl:
            ax3.axvline(t_ppl, color="black", linestyle=":", lw=1.5)
        lo, hi = min(values) / 1.04, max(values) * 1.15            # room for the values written on the right
        ax3.set_xscale("log")
        ax3.set_xlim(lo, hi)
        label_log_axis(ax3.xaxis, lo, hi)
        ax3.set_ylim(len(ranked) - 0.5, -0.5)                      # the best at the top
    ax3.set(xlabel=f"perplexity on {where} (log scale; dotted: the teacher)", title="runs ranked by final perplexity")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)

    # panel 2's runs: many share one size, and their perplexities are close, so each run of a size is
    # moved sideways (in points, as a swarm plot does) just far enough not to cover another
    if done:
        fig.draw_without_rendering()                              # the layout: the axes' final size
        lo, hi = (math.log(v) for v in ax2.get_ylim())
        height = ax2.get_window_extent().height * 72 / fig.dpi    # points
        same_size: dict[int, list[dict]] = {}
        for r in done:
            same_size.setdefault(r["num_params"], []).append(r)
        for group in same_size.values():
            ys = [(math.log(ppl[r["name"]]) - lo) / (hi - lo) * height for r in group]
            for r, dx in zip(group, swarm_offsets(ys, MARKER_POINTS)):
                color, marker, _ = styles[r["name"]]
                shift = offset_copy(ax2.transData, fig=fig, x=dx, units="points")
                ax2.scatter([r["num_params"] / 1e6], [ppl[r["name"]]], color=color, marker=marker, s=MARKER_POINTS ** 2,
                            edgecolors="black", linewidths=0.4, transform=shift, zorder=3)
    return fig


def swarm_offsets(ys: list[float], size: float) -> list[float]:
    """Sideways offsets for points at heights ys (in points) on one vertical line, so that no two
    centres are closer than `size`: each point, lowest first, takes the offset nearest the line
    (0, +size, -size, +2 size, ...) that keeps it clear of the points already placed."""
    placed: list[tuple[float, float]] = []
    offsets = [0.0] * len(ys)
    for i in sorted(range(len(ys)), key=lambda i: ys[i]):
        for k in range(2 * len(ys) + 1):          # n - 1 placed points block at most 2n - 2 of them
            dx = (k + 1) // 2 * size * (1 if k % 2 else -1)
            if all(math.hypot(dx - px, ys[i] - py) >= size for px, py in placed):
                break
        offsets[i] = dx
        placed.append((dx, ys[i]))
    return offsets


def plot(records: list[dict], path: str, title: str) -> None:
    """figure() as a PNG at path, written atomically (ImportError without matplotlib)."""
    fig = figure(records, title)
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
