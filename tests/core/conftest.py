from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hdm_core import PRESETS, XUT, save_checkpoint
from hdm_core.codec import PixelCodec
from hdm_demo.text_encoder import build_toy_text_encoder

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "hdm-reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def reference_cases() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "xut-tiny-cases.safetensors")


@pytest.fixture(scope="session")
def reference_meta() -> dict:
    return json.loads((REFERENCE / "xut-tiny.json").read_text())


@pytest.fixture(scope="session")
def toy_text_encoder(tmp_path_factory) -> Path:
    return build_toy_text_encoder(tmp_path_factory.mktemp("te") / "toy-qwen3", hidden_size=64)


@pytest.fixture(scope="session")
def pixel_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-pixel-debug"])
    # Give the zero-initialised output layers values so the network's output depends on its inputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixel.safetensors", model, codec=PixelCodec())
