"""Training transcoders, skip transcoders and SAEs on a hooked model."""

from tl_transcoders.training.config import TrainConfig
from tl_transcoders.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
