"""Run a progressive-growth experiment: grow through a width schedule and compare with scratch.

Examples:
    python scripts/progressive.py --preset readme
    python scripts/progressive.py --sizes 4,8,16 --steps 1000,1000,2000 --modes mirror,tile --seeds 0,1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

try:
    import growth  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from growth.experiment import (
    PRESETS,
    Arm,
    ExperimentConfig,
    ScheduleError,
    parse_int_list,
    preset,
    schedule_arms,
)
from growth.plots import plot_runs
from growth.runner import ExperimentRunner
from growth.summary import format_table, write_summary
from models.checkpoint import CheckpointError
from models.data import CorpusError
from models.device import DEVICE_CHOICES, resolve_device
from models.train import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    recipe = Arm("defaults", [4], [1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, help="run a reference experiment (other schedule flags are ignored)")
    parser.add_argument("--sizes", default="4,8,16", help="comma-separated widths (d_model), each an integer multiple of the one before")
    parser.add_argument("--steps", default="1000,1000,2000", help="comma-separated optimizer steps at each width")
    parser.add_argument("--modes", default="mirror", help="comma-separated growth modes, one progressive arm each: mirror, tile")
    parser.add_argument("--noise", type=float, default=None, help="mirror noise: standard deviation relative to the RMS of each tiled block W/k (default: the growth module's)")
    parser.add_argument("--optimizer", choices=("grow", "reset"), default=recipe.optimizer, help="AdamW state at growth: carried over and rescaled (grow) or fresh (reset)")
    parser.add_argument("--width-aware", action=argparse.BooleanOptionalAction, default=recipe.width_aware, help="scale learning rate, weight decay, eps and clipping per parameter with the growth factor (with --optimizer grow and tile, training follows the source model's curve)")
    parser.add_argument("--rewarmup-steps", type=int, default=recipe.rewarmup_steps, help="after each growth, ramp the learning rate up again over this many steps (0: continue the schedule)")
    parser.add_argument("--baselines", choices=("scratch", "none"), default="scratch", help="also train each grown width from scratch on the same tokens")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every arm runs once per seed")
    parser.add_argument("--init", help="checkpoint the progressive arms start from instead of a fresh model")
    parser.add_argument("--data", help="corpus file or directory (default: the Python documentation topics)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences of 64 bytes per step")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup at the start of each arm")
    parser.add_argument("--eval-interval", type=int, default=defaults.eval_interval, help="steps between validation evaluations")
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches, help="validation batches per evaluation")
    parser.add_argument("--dropout", type=float, default=None, help="override every model's dropout rate (default: derived from d_model)")
    parser.add_argument("--name", help="run name (default: the preset's name, or one built from the sizes)")
    parser.add_argument("--runs-dir", default="runs", help="parent directory of run directories")
    parser.add_argument("--figures-dir", help="also copy the figures here (the readme preset defaults to figures/<name>)")
    parser.add_argument("--workers", type=int, default=1, help="train this many (arm, seed) pairs at once, each in its own process with one thread")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads with --workers 1 (default: torch's choice; 1 is best on a busy machine)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to train")
    parser.add_argument("--no-fast", action="store_true", help="use the reference attention and loss instead of the fast path")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.preset:
        config = preset(args.preset)
        if args.name:
            config.name = args.name
        return config
    sizes = parse_int_list(args.sizes, "--sizes")
    steps = parse_int_list(args.steps, "--steps")
    if len(sizes) != len(steps):
        raise ScheduleError(f"--sizes has {len(sizes)} widths but --steps has {len(steps)} step counts; give one per width")
    if len(sizes) < 2:
        raise ScheduleError("--sizes needs at least two widths to grow through")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    arms = schedule_arms(
        sizes, steps, modes, baselines=args.baselines == "scratch",
        noise=args.noise, optimizer=args.optimizer, width_aware=args.width_aware, rewarmup_steps=args.rewarmup_steps,
    )
    train = TrainConfig(
        steps=sum(steps), batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        dropout=args.dropout,
    )
    name = args.name or "grow-" + "-".join(map(str, sizes))
    return ExperimentConfig(
        name=name, arms=arms, seeds=parse_int_list(args.seeds, "--seeds"), train=train,
        data=args.data, init_checkpoint=args.init,
        description=f"{' -> '.join(map(str, sizes))}, {sum(steps)} steps of {args.batch_size}x64 bytes",
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # Checked before the runner writes the run directory, so a rejected command leaves nothing behind.
    if args.workers < 1:
        print(f"progressive.py: error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"progressive.py: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        config = build_config(args)
        config.validate()
        device = resolve_device(args.device)
        runner = ExperimentRunner(config, Path(args.runs_dir) / config.name, device=device, fast=not args.no_fast)
        runner.prepare()
    except (ScheduleError, CorpusError, CheckpointError, ValueError) as error:
        print(f"progressive.py: error: {error}", file=sys.stderr)
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    todo = runner.pending()
    total_steps = sum(arm.total_steps for arm, _ in todo)
    print(f"run directory: {runner.run_dir} ({len(todo)} of {len(config.arms) * len(config.seeds)} arm-seeds to train)")
    started = time.perf_counter()
    with tqdm(total=total_steps, unit="step", dynamic_ncols=True) as bar:
        def on_step(arm_name: str, seed: int) -> None:
            bar.set_description(f"{arm_name} seed {seed}", refresh=False)
            bar.update(1)

        def on_arm_done(arm, seed: int) -> None:
            if args.workers > 1:  # workers report whole arms, not steps
                bar.set_description(f"finished {arm.name} seed {seed}", refresh=False)
                bar.update(arm.total_steps)

        try:
            runner.run(on_step=on_step, workers=args.workers, on_arm_done=on_arm_done)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"interrupted; finished arms are kept in {runner.run_dir}. Rerun the same command to "
                "train the rest (an unfinished arm starts again from its beginning).",
                file=sys.stderr,
            )
            return 130
    wall = time.perf_counter() - started

    summary = write_summary(runner.run_dir)
    figures_dir = runner.run_dir / "figures"
    paths = plot_runs([runner.run_dir], figures_dir)
    copy_to = args.figures_dir or (f"figures/{config.name}" if args.preset else None)
    if copy_to:
        plot_runs([runner.run_dir], copy_to)
    print(format_table(summary))
    for row in summary["arms"]:
        if row["compute_ratio_note"]:
            print(f"{row['arm']}: {row['compute_ratio_note']}")
    if args.workers > 1:
        threads = f"{args.workers} worker processes of 1 thread"
    else:
        count = torch.get_num_threads()
        threads = f"{count} thread" + ("" if count == 1 else "s")
    print(f"wall time: {wall:.0f} s on {device} with {threads}")
    print("figures: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
