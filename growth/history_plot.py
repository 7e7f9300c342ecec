"""Figure of the validation loss before and after each expansion in a checkpoint's growth history."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is set)

from models.checkpoint import CheckpointMeta, read_checkpoint_meta  # noqa: E402

MIN_LOSS_SPAN = 0.1  # nats/byte


def plot_growth_history(meta_or_path: CheckpointMeta | str | Path, out_png: str | Path) -> Path:
    """Save a PNG of loss before and after each expansion (x: "4→8", ...; y: nats/byte) and return its path.

    Raises ValueError when the checkpoint has no growth history, or CheckpointError for a bad file.
    """
    meta = meta_or_path if isinstance(meta_or_path, CheckpointMeta) else read_checkpoint_meta(meta_or_path)
    history = meta.growth_history
    if not history:
        raise ValueError("the checkpoint has no growth history to plot")

    labels = [f"{entry['from']}→{entry['to']}" for entry in history]
    positions = range(len(history))
    before = [entry["loss_before"] for entry in history]
    after = [entry["loss_after"] for entry in history]

    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(history) + 2.0), 3.5))
    axis.plot(positions, before, "o", markersize=9, fillstyle="none", label="before (source model)")
    axis.plot(positions, after, "x", markersize=7, label="after (grown model)")
    axis.set_xticks(list(positions), labels)
    axis.set_xlim(-0.5, len(history) - 0.5)
    axis.set_xlabel("expansion (d_model before → after)")
    axis.set_ylabel("validation loss (nats/byte)")
    axis.ticklabel_format(axis="y", useOffset=False)

    # An exact expansion changes the loss by ~1e-7, so the axis spans at least MIN_LOSS_SPAN to show
    # that as coincident markers rather than magnifying the rounding.
    low, high = min(before + after), max(before + after)
    middle, half_span = (low + high) / 2, max(high - low, MIN_LOSS_SPAN) / 2 * 1.15
    axis.set_ylim(middle - half_span, middle + half_span)
    largest_change = max(abs(a - b) for a, b in zip(after, before))
    axis.text(0.98, 0.04, f"max |after - before| = {largest_change:.1e} nats/byte", transform=axis.transAxes,
              ha="right", va="bottom", fontsize=8)

    corpus = (meta.corpus or {}).get("source", "corpus not recorded")
    widths = "→".join(str(width) for width in [history[0]["from"], *(entry["to"] for entry in history)])
    axis.set_title(f"Growth d_model {widths}, {meta.config.n_layers} layers\n{corpus}", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()

    out_png = Path(out_png)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png
