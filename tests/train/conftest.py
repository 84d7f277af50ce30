"""Shared fixtures for the training tests: a toy text encoder, a small synthetic set, and config writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hdm_core.train.config import dump_toml
from hdm_demo.shapes import generate_dataset
from hdm_demo.text_encoder import build_toy_text_encoder

REPO = Path(__file__).resolve().parents[2]

# A very small pixel-space XUT so that a training step takes tens of milliseconds on one CPU core.
TINY_MODEL = {
    "preset": "xut-pixel-debug",
    "overrides": {"dim": 32, "heads": 2, "head_dim": 16, "mlp_dim": 64},
}


@pytest.fixture(scope="session")
def toy_te(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_text_encoder(tmp_path_factory.mktemp("te") / "toy-te", hidden_size=64, num_layers=1)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", count=24, size=32, seed=0)


@pytest.fixture
def make_config(toy_te: Path, shapes_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny training config; keyword arguments replace whole top-level sections."""

    def make(name: str = "cfg.toml", **sections: Any) -> Path:
        cfg: dict[str, Any] = {
            "seed": 7,
            "model": dict(TINY_MODEL),
            "text_encoder": {"path": str(toy_te), "max_length": 8},
            "data": {"path": str(shapes_dir), "num_workers": 0},
            "schedule": {"warmup_steps": 2},
            "train": {"checkpoint_every": 2, "keep_last_n": 3, "num_threads": 1},
            "stages": [{"resolution": 16, "batch_size": 2, "grad_accum": 1, "lr": 0.5, "steps": 4}],
        }
        cfg.update(sections)
        path = tmp_path / name
        path.write_text(dump_toml(cfg))
        return path

    return make


def train_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run `python -m hdm_core.train ...` in a fresh process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hdm_core.train", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final.safetensors")
