"""Redraw the figures of one or more progressive-growth run directories without retraining.

Examples:
    python scripts/plot.py runs/readme
    python scripts/plot.py runs/mirror-run runs/tile-run --out figures/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import growth  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from growth.plots import plot_runs
from growth.summary import format_table, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories written by scripts/progressive.py")
    parser.add_argument("--out", help="figure directory (default: RUN_DIR/figures for one run, figures/compare for several)")
    args = parser.parse_args(argv)

    try:
        for run_dir in args.run_dirs:
            print(f"{run_dir}:\n{format_table(write_summary(run_dir))}\n")
        out = args.out or (str(Path(args.run_dirs[0]) / "figures") if len(args.run_dirs) == 1 else "figures/compare")
        paths = plot_runs(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as error:
        print(f"plot.py: error: {error}", file=sys.stderr)
        return 2
    print("figures: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
