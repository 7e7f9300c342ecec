"""Figures for progressive-growth runs, drawn from run directories without retraining.

1. validation loss against tokens, with each expansion marked and its before/after losses;
2. validation loss against cumulative training FLOPs (log x), progressive against scratch;
3. the loss change at each expansion, per recipe and seed;
4. how far the copies made by the latest growth drift apart, tile against mirror.
Every curve is the mean over seeds with a min-max band.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files
import matplotlib.pyplot as plt  # noqa: E402

from growth.summary import ArmCurves, corpus_label, load_run  # noqa: E402

FIGURES = ("loss_vs_tokens.png", "loss_vs_flops.png", "expansion_jumps.png", "copy_drift.png")


def _band(curves: ArmCurves, x_key: str, y_key: str) -> tuple[list, list, list, list]:
    seeds = sorted(curves.evals)
    length = min(len(curves.evals[s]) for s in seeds)
    x = [curves.evals[seeds[0]][i][x_key] for i in range(length)]
    columns = [[curves.evals[s][i][y_key] for s in seeds] for i in range(length)]
    mean = [sum(c) / len(c) for c in columns]
    return x, mean, [min(c) for c in columns], [max(c) for c in columns]


def _collect(run_dirs: list[Path]) -> tuple[dict[str, ArmCurves], str]:
    """Arms of every run, names prefixed by the run name when several runs are compared."""
    combined, titles = {}, []
    for run_dir in run_dirs:
        config, arms = load_run(run_dir)
        titles.append(f"{config.description or config.name} [{corpus_label(run_dir)}]")
        for name, curves in arms.items():
            label = name if len(run_dirs) == 1 else f"{config.name}/{name}"
            combined[label] = curves
    return combined, "; ".join(titles)


def _title(ax, text: str) -> None:
    ax.set_title(textwrap.fill(text, 100), fontsize=9)


def _style(name: str, index: int) -> dict:
    color = f"C{index % 10}"
    return {"color": color, "linestyle": "--" if "scratch" in name else "-"}


def plot_loss(arms: dict[str, ArmCurves], title: str, x_key: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (name, curves) in enumerate(arms.items()):
        style = _style(name, index)
        x, mean, low, high = _band(curves, x_key, "val_loss")
        if x_key == "flops":  # a log axis cannot show the fresh model's evaluation at 0 FLOPs
            keep = [i for i, value in enumerate(x) if value > 0]
            x, mean, low, high = ([series[i] for i in keep] for series in (x, mean, low, high))
        seeds = len(curves.evals)
        ax.plot(x, mean, label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})", **style)
        ax.fill_between(x, low, high, color=style["color"], alpha=0.2, linewidth=0)
        events = [events for events in curves.growths.values()]
        for position in range(len(events[0]) if events else 0):
            at = events[0][position][x_key]
            before = sum(e[position]["loss_before"] for e in events) / len(events)
            after = sum(e[position]["loss_after"] for e in events) / len(events)
            ax.axvline(at, color=style["color"], alpha=0.35, linewidth=0.8, linestyle=":")
            ax.plot([at], [before], marker="o", markerfacecolor="none", color=style["color"], markersize=7)
            ax.plot([at], [after], marker="x", color=style["color"], markersize=6)
    if x_key == "flops":
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training FLOPs (forward + backward)")
    else:
        ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("validation loss (nats per byte)")
    _title(ax, f"Validation loss, {title}. Markers: o before growth, x after growth; bands: min-max over seeds; "
               "y axis zoomed past the first evaluations.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _zoom_y(ax, arms)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _zoom_y(ax, arms: dict[str, ArmCurves]) -> None:
    """Clip the y axis above so the first evaluations of a fresh model do not flatten the curves."""
    finals = [curves.mean_curve()[2][-1] for curves in arms.values()]
    starts = [curves.mean_curve()[2][min(2, len(curves.mean_curve()[2]) - 1)] for curves in arms.values()]
    low, high = min(finals), max(starts)
    if high > low:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))


def plot_jumps(arms: dict[str, ArmCurves], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, position = [], 0
    for index, (name, curves) in enumerate(arms.items()):
        if not any(curves.growths.values()):
            continue
        count = len(next(iter(curves.growths.values())))
        for expansion in range(count):
            changes = [events[expansion]["loss_after"] - events[expansion]["loss_before"] for events in curves.growths.values()]
            event = next(iter(curves.growths.values()))[expansion]
            ax.scatter([position] * len(changes), changes, color=f"C{index % 10}", zorder=3)
            ax.bar(position, sum(changes) / len(changes), color=f"C{index % 10}", alpha=0.4)
            labels.append(f"{name}\n{event['from']}→{event['to']}")
            position += 1
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_xlabel("arm and expansion (width before → after)")
    ax.set_ylabel("loss after − loss before (nats per byte)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _title(ax, f"Validation-loss change at each expansion, {title}. Bars: seed mean; dots: seeds.")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_drift(arms: dict[str, ArmCurves], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, (name, curves) in enumerate(arms.items()):
        if not any(curves.growths.values()):
            continue
        x, mean, low, high = _band(curves, "tokens", "copy_drift")
        growth_tokens = [event["tokens"] for event in next(iter(curves.growths.values()))]
        # One segment per stage: each growth makes new copies, whose spread starts again from 0.
        for stage, start in enumerate(growth_tokens):
            end = growth_tokens[stage + 1] if stage + 1 < len(growth_tokens) else float("inf")
            points = [(t, m, lo, hi) for t, m, lo, hi in zip(x, mean, low, high) if start < t <= end and m > 0]
            if not points:
                continue
            t, m, lo, hi = zip(*points)
            ax.plot(t, m, label=name if stage == 0 else None, color=f"C{index % 10}", marker=".")
            ax.fill_between(t, lo, hi, color=f"C{index % 10}", alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("copy spread: RMS(copy − mean) / RMS(mean)")
    _title(ax, f"Spread between the copies made by the latest growth (token embedding columns), {title}. Bands: min-max over seeds.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw the four figures for one run, or for several runs compared on shared axes."""
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms, title = _collect(run_dirs)
    if not arms:
        raise ValueError(f"no finished arms in {', '.join(map(str, run_dirs))}")
    paths = [out_dir / name for name in FIGURES]
    plot_loss(arms, title, "tokens", paths[0])
    plot_loss(arms, title, "flops", paths[1])
    plot_jumps(arms, title, paths[2])
    plot_drift(arms, title, paths[3])
    return paths
