"""Training: the engine, its configuration, optimizers and schedules, checkpoints."""

from .config import TrainConfig, load_config
from .trainer import TrainingDiverged, TrainingError, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingError", "TrainingInterrupted", "load_config",
           "train"]
