"""The training stack (kept apart from the model library, which imports without it)."""

from meteor.train.args import STAGE_PRESETS, TrainConfig, TrainConfigError
from meteor.train.loop import TrainResult, train

__all__ = ["STAGE_PRESETS", "TrainConfig", "TrainConfigError", "TrainResult", "train"]
