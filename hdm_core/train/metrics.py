"""The run's metrics: `metrics.jsonl` (one object per logged step; the worker tails it) and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocations on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Rank 0 appends; other ranks hold a disabled one."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "train.tensorboard is on but tensorboard is not installed (pip install hdm-serve[tensorboard])"
                )
            else:
                self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
