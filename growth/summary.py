"""Summaries of a run directory: per-arm statistics over seeds and the compute ratio.

The compute ratio of a progressive arm is the training FLOPs it needed to first reach the final
validation loss of the from-scratch arm of the same final width, divided by that scratch arm's total
FLOPs. Below 1 means growing saved compute. Both are read from the seed-mean loss curves, and the
crossing point is interpolated linearly in FLOPs between the two evaluations that bracket it. When
the arm never reaches that loss, the scratch arm's loss at the arm's total FLOPs still compares the
two at equal compute.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from growth.experiment import ExperimentConfig
from growth.runner import RESULT_FILE


@dataclass
class ArmCurves:
    """Per-seed evaluation records and growth events of one arm."""

    name: str
    evals: dict[int, list[dict]]  # seed -> eval records in step order
    growths: dict[int, list[dict]]  # seed -> growth events
    results: dict[int, dict]  # seed -> result.json

    def mean_curve(self, key: str = "val_loss") -> tuple[list[int], list[int], list[float]]:
        """Return tokens, FLOPs and the seed-mean of `key` at evaluations shared by every seed."""
        seeds = sorted(self.evals)
        length = min(len(self.evals[seed]) for seed in seeds)
        first = self.evals[seeds[0]][:length]
        tokens = [record["tokens"] for record in first]
        flops = [record["flops"] for record in first]
        values = [statistics.fmean(self.evals[seed][i][key] for seed in seeds) for i in range(length)]
        return tokens, flops, values


def load_run(run_dir: str | Path) -> tuple[ExperimentConfig, dict[str, ArmCurves]]:
    """Read a run directory's config, metrics and results; arms with no finished seed are left out."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.json): {run_dir}")
    config = ExperimentConfig.from_dict(json.loads(config_path.read_text()))
    arms = {}
    for arm in config.arms:
        curves = ArmCurves(arm.name, {}, {}, {})
        for seed in config.seeds:
            directory = run_dir / arm.name / f"seed{seed}"
            if not (directory / RESULT_FILE).is_file():
                continue
            records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
            curves.evals[seed] = [r for r in records if r["event"] == "eval"]
            curves.growths[seed] = [r for r in records if r["event"] == "growth"]
            curves.results[seed] = json.loads((directory / RESULT_FILE).read_text())
        if curves.results:
            arms[arm.name] = curves
    return config, arms


def first_crossing(flops: list[int], losses: list[float], target: float) -> float | None:
    """FLOPs at which the loss curve first reaches `target`, interpolated; None if it never does."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(flops[0])
            previous_flops, previous_loss = flops[i - 1], losses[i - 1]
            fraction = (previous_loss - target) / (previous_loss - loss)
            return previous_flops + fraction * (flops[i] - previous_flops)
    return None


def loss_at(flops: list[int], losses: list[float], target_flops: float) -> float | None:
    """Loss of a curve at `target_flops`, interpolated linearly; None outside the curve."""
    for i in range(1, len(flops)):
        if flops[i - 1] <= target_flops <= flops[i]:
            fraction = (target_flops - flops[i - 1]) / (flops[i] - flops[i - 1])
            return losses[i - 1] + fraction * (losses[i] - losses[i - 1])
    return None


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Build the summary of a run directory: one entry per arm with losses, cost and compute ratio."""
    config, arms = load_run(run_dir)
    arm_specs = {arm.name: arm for arm in config.arms}
    scratch_by_width = {
        arm_specs[name].final_width: curves for name, curves in arms.items() if arm_specs[name].is_scratch
    }

    rows = []
    for name, curves in arms.items():
        spec = arm_specs[name]
        results = list(curves.results.values())
        parameters = results[0]["parameters"]
        tokens = results[0]["tokens"]
        jumps = []
        for index in range(len(spec.sizes) - 1):
            deltas = [events[index]["loss_after"] - events[index]["loss_before"] for events in curves.growths.values()]
            jumps.append({
                "from": spec.sizes[index],
                "to": spec.sizes[index + 1],
                "mean_change": statistics.fmean(deltas),
                "max_abs_change": max(abs(d) for d in deltas),
            })
        row = {
            "arm": name,
            "sizes": spec.sizes,
            "steps": spec.steps,
            "recipe": None if spec.is_scratch else {
                "mode": spec.mode, "noise": spec.noise, "optimizer": spec.optimizer,
                "width_aware": spec.width_aware, "rewarmup_steps": spec.rewarmup_steps,
            },
            "seeds": sorted(curves.results),
            "final_val_loss": spread([r["final_val_loss"] for r in results]),
            "flops": results[0]["flops"],
            "tokens": tokens,
            "parameters": parameters,
            "tokens_per_parameter": tokens / parameters,
            "wall_time_s": spread([r["wall_time_s"] for r in results]),
            "expansions": jumps,
            "compute_ratio": None,
            "compute_ratio_note": "",
            "scratch_loss_at_same_flops": None,
        }
        scratch = scratch_by_width.get(spec.final_width)
        if not spec.is_scratch and scratch is not None:
            target = statistics.fmean(r["final_val_loss"] for r in scratch.results.values())
            _, flops, losses = curves.mean_curve()
            crossing = first_crossing(flops, losses, target)
            scratch_flops = next(iter(scratch.results.values()))["flops"]
            _, scratch_curve_flops, scratch_losses = scratch.mean_curve()
            row["scratch_loss_at_same_flops"] = loss_at(scratch_curve_flops, scratch_losses, row["flops"])
            if crossing is None:
                row["compute_ratio_note"] = f"never reached scratch-{spec.final_width}'s final loss {target:.4f}"
            else:
                row["compute_ratio"] = crossing / scratch_flops
                row["compute_ratio_note"] = f"reached scratch-{spec.final_width}'s final loss {target:.4f}"
        rows.append(row)
    return {"name": config.name, "description": config.description, "corpus": corpus_label(run_dir), "arms": rows}


def corpus_label(run_dir: str | Path) -> str:
    """Corpus source as recorded in the first finished arm's checkpoint metadata."""
    from models.checkpoint import read_checkpoint_meta

    for path in sorted(Path(run_dir).glob("*/seed*/d*.safetensors")):
        if path.name.endswith(".train.safetensors"):
            continue
        corpus = read_checkpoint_meta(path).corpus or {}
        return str(corpus.get("source", "unknown corpus"))
    return "unknown corpus"


def format_table(summary: dict[str, Any]) -> str:
    """Render the summary as a Markdown table."""
    lines = [
        "| arm | final val loss (nats/byte, mean ± std) | total FLOPs | tokens/param | wall time (s) | loss change at each expansion | compute ratio | scratch loss at the same FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["arms"]:
        loss = row["final_val_loss"]
        jumps = ", ".join(f"{j['from']}→{j['to']}: {j['mean_change']:+.1e}" for j in row["expansions"]) or "–"
        if row["compute_ratio"] is not None:
            ratio = f"{row['compute_ratio']:.2f}"
        elif row["compute_ratio_note"]:
            ratio = "never reached"
        else:
            ratio = "–"
        at_same = row["scratch_loss_at_same_flops"]
        lines.append(
            f"| {row['arm']} | {loss['mean']:.4f} ± {loss['std']:.4f} | {row['flops']:.3g} | "
            f"{row['tokens_per_parameter']:.1f} | {row['wall_time_s']['mean']:.0f} | {jumps} | {ratio} | "
            f"{'–' if at_same is None else f'{at_same:.4f}'} |"
        )
    return "\n".join(lines)


def write_summary(run_dir: str | Path) -> dict[str, Any]:
    summary = summarize(run_dir)
    run_dir = Path(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(format_table(summary) + "\n")
    return summary
