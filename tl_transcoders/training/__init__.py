"""Training transcoders, skip transcoders and SAEs on a hooked model."""

from tl_transcoders.training.config import TrainConfig
from tl_transcoders.training.trainer import Trainer, fit_together

__all__ = ["TrainConfig", "Trainer", "fit_together"]
