"""The demo config trains: a shortened run of configs/demo-pixel.toml must reduce the loss.

The full demo and its held-out colour accuracy are measured by bench/demo_eval.py (see docs/training.md).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hdm_core.train import run_training
from hdm_core.train.config import config_from_dict

from .conftest import REPO, read_metrics


def test_demo_config_loss_drops(toy_te: Path, shapes_dir: Path, tmp_path: Path) -> None:
    raw = tomllib.loads((REPO / "configs" / "demo-pixel.toml").read_text())
    cfg = config_from_dict(raw, base_dir=REPO)  # the shipped file itself must validate
    res = [s.resolution for s in cfg.stages]
    assert len(res) == 2 and res[0] < res[1] and all(s.tread_rate > 0 for s in cfg.stages)
    # Same model, optimizer and recipe; the fixtures' data and text encoder, and far fewer, smaller steps.
    raw["text_encoder"] = {**raw["text_encoder"], "path": str(toy_te)}
    raw["data"] = {**raw["data"], "path": str(shapes_dir), "num_workers": 0}
    raw["sampling"] = {"every": 0}
    raw["train"] = {**raw["train"], "checkpoint_every": 1000, "num_threads": 1}
    raw["schedule"] = {**raw["schedule"], "warmup_steps": 5}
    raw["stages"] = [
        {**raw["stages"][0], "batch_size": 8, "steps": 40},
        {**raw["stages"][1], "batch_size": 4, "steps": 4},
    ]
    result = run_training(config_from_dict(raw), tmp_path / "run")
    assert result.finished
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["stage"] == 0]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
