"""Function-preserving width growth of TinyTransformer models and checkpoints (see growth.expand)."""

from growth.benchmark import benchmark_growth
from growth.checkpoint import grow_checkpoint
from growth.expand import DEFAULT_NOISE, MODES, expand, expand_parameter, is_tiled_matrix, repeat_parameter
from growth.history_plot import plot_growth_history

__all__ = [
    "DEFAULT_NOISE",
    "MODES",
    "benchmark_growth",
    "expand",
    "expand_parameter",
    "grow_checkpoint",
    "is_tiled_matrix",
    "plot_growth_history",
    "repeat_parameter",
]
