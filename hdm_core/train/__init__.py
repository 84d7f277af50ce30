"""Training: the TOML config, the run folder, distributed setup, the optimizer and the loop (spec §6).

    python -m hdm_core.train CONFIG.toml --run-dir DIR [--resume] [--max-steps N]

Exports resolve lazily, so `hdm_core.train.config` (the config models the API's train-job schema reuses) imports
no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "TrainConfigError": "config",
    "config_from_dict": "config",
    "dump_toml": "config",
    "load_config": "config",
    "write_config": "config",
    "RunDir": "run_dir",
    "TrainingResult": "loop",
    "TrainingTerminated": "run",
    "run_training": "run",
    "build_optimizer": "optim",
    "fan_in": "optim",
    "lr_factor": "optim",
    "stage_steps": "optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hdm_core.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
