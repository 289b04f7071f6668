"""The training stack (kept apart from the model library, which imports without it)."""

from .args import STAGE_PRESETS, TrainConfig, TrainConfigError
from .loop import TrainResult, train

__all__ = ["STAGE_PRESETS", "TrainConfig", "TrainConfigError", "TrainResult", "train"]
