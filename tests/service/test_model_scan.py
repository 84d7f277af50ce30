"""Start-up scan of HDM_MODELS_DIR: only XUT checkpoints are registered, not the text encoder's or the VAE's
weights in Hugging Face folders, nor other safetensors (no processes: SQLite, the scan function itself)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from app.db import reset_caches, session_scope
from app.migrate import upgrade
from app.models import Checkpoint
from app.services.models import is_xut_checkpoint, scan_models_dir
from app.settings import get_settings


def _safetensors(path: Path, keys: list[str]) -> Path:
    """A valid safetensors file with tiny float32 tensors under these names."""
    header, offset = {}, 0
    for k in keys:
        header[k] = {"dtype": "F32", "shape": [2], "data_offsets": [offset, offset + 8]}
        offset += 8
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def test_scan_registers_only_xut_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    _safetensors(models / "released.safetensors", ["unet.model.in_patch.proj.weight", "vae.decoder.x"])
    _safetensors(models / "sub" / "diffusers-style.safetensors", ["model.in_patch.proj.weight"])
    _safetensors(models / "train" / "j" / "step-4.safetensors", ["in_patch.proj.weight", "blocks.0.w"])
    _safetensors(models / "Qwen3-0.6B" / "model.safetensors", ["model.embed_tokens.weight"])
    (models / "Qwen3-0.6B" / "config.json").write_text("{}")
    # a folder with config.json is skipped as a whole, even if a file in it looks like an XUT
    _safetensors(models / "vae" / "diffusion_pytorch_model.safetensors", ["in_patch.proj.weight"])
    (models / "vae" / "config.json").write_text("{}")
    _safetensors(models / "lora.safetensors", ["lora_unet_down.weight"])
    (models / "broken.safetensors").write_bytes(b"nonsense")
    assert is_xut_checkpoint(models / "released.safetensors")
    assert not is_xut_checkpoint(models / "lora.safetensors") and not is_xut_checkpoint(
        models / "broken.safetensors"
    )

    url = f"sqlite:///{tmp_path / 'hdm.db'}"
    monkeypatch.setenv("HDM_DATABASE_URL", url)
    monkeypatch.setenv("HDM_MODELS_DIR", str(models))
    get_settings.cache_clear()
    reset_caches()
    try:
        upgrade(url)
        with session_scope() as session:
            assert scan_models_dir(session) == 3
            names = sorted(c.name for c in session.query(Checkpoint))
        assert names == ["diffusers-style", "released", "step-4"], names
    finally:
        get_settings.cache_clear()
        reset_caches()
