"""The TinyTransformer, its data, checkpoints and training loop."""

from models.config import ModelConfig
from models.model import TinyTransformer, set_dropout

__all__ = ["ModelConfig", "TinyTransformer", "set_dropout"]
