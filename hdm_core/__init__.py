"""hdm_core: the HDM model library (XUT, flow matching, samplers, checkpoints). No web, no database."""

from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, XUTConfig
from .model import XUT, count_parameters
from .rope import position_map

__all__ = [
    "PRESETS",
    "XUT",
    "CheckpointError",
    "LoadedCheckpoint",
    "XUTConfig",
    "count_parameters",
    "load_checkpoint",
    "position_map",
    "save_checkpoint",
]
