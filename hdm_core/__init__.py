"""hdm_core: the HDM model library (XUT, flow matching, samplers, checkpoints). No web, no database.

Exports resolve lazily, so `hdm_core.config` (presets, architecture validation) can be used by processes that never
import torch (the API validates architecture objects with it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "LoadedCheckpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "PRESETS": "config",
    "XUTConfig": "config",
    "XUT": "model",
    "count_parameters": "model",
    "position_map": "rope",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hdm_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
