"""Training transcoders, skip transcoders and SAEs on a hooked model: `TrainConfig`
(every option), `Trainer` (one run over many layers), `TrainerGroup` (several runs from
one forward pass per batch)."""

from tl_transcoders.training.checkpoints import TrainingError
from tl_transcoders.training.config import TrainConfig
from tl_transcoders.training.trainer import CrossLayerTrainer, NonFiniteError, Trainer, TrainerGroup, fit_together

__all__ = [
    "CrossLayerTrainer",
    "NonFiniteError",
    "TrainConfig",
    "Trainer",
    "TrainerGroup",
    "TrainingError",
    "fit_together",
]
