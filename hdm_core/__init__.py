"""hdm_core: the HDM model library (XUT, flow matching, samplers, checkpoints). No web, no database."""

from .config import PRESETS, XUTConfig
from .model import XUT, count_parameters
from .rope import position_map

__all__ = ["PRESETS", "XUT", "XUTConfig", "count_parameters", "position_map"]
