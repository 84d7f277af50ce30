"""Training caches ([cache]): built once, reused by the next run, one changed image re-encoded alone, and the same
losses as encoding online (a tiny real diffusers AutoencoderKL and the toy text encoder)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from hdm_core.train import run_training
from hdm_core.train.config import load_config

from .conftest import TINY_MODEL, read_metrics


def build_tiny_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=4,
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def vae_run(make_config: Callable[..., Path], shapes_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    vae = build_tiny_vae(tmp_path / "vae")
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)

    def make(name: str, **cache: object) -> Path:
        return make_config(
            f"{name}.toml",
            model={**TINY_MODEL, "overrides": {**TINY_MODEL["overrides"], "in_channels": 4}},
            codec={"kind": "vae", "path": str(vae)},
            data={"path": str(data), "num_workers": 0},
            cache=cache,
            train={"checkpoint_every": 100, "keep_last_n": 1, "num_threads": 1},
            stages=[
                {"resolution": 16, "batch_size": 4, "lr": 0.5, "steps": 6, "tread_rate": 0.5},
                {"resolution": 32, "batch_size": 2, "lr": 0.5, "steps": 3, "caption_dropout": 0.5},
            ],
        )

    return make


def cache_records(run: Path) -> dict[str, dict]:
    return {r["cache"]: r for r in read_metrics(run) if r.get("kind") == "cache"}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_cache_built_once_reused_and_invalidated_per_image(
    vae_run: Callable[..., Path], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    ref = run_training(load_config(vae_run("ref")), tmp_path / "ref")
    cfg = load_config(vae_run("cached", latents=True, text=True, dir=str(cache_dir)))
    first = run_training(cfg, tmp_path / "first")
    assert ref.finished and first.finished
    built = cache_records(tmp_path / "first")
    # 24 square images (one crop per size): 6 x 4 samples = one epoch, every image at 16 px; 3 x 2 samples = 6
    # distinct images (the start of a permutation) at 32 px. Caption variants: the caption and "" (dropout).
    assert built["latents"]["total"] == 24 and built["latents"]["crops"] == 24 + 6
    assert 24 < built["text"]["total"] <= 48
    # Cached latents are sampled from the stored Gaussian with the step's seed, as the VAE's encode samples them;
    # the only difference is the encoder's batch (one image vs the micro-batch): float rounding.
    assert losses(tmp_path / "first") == pytest.approx(losses(tmp_path / "ref"), rel=1e-4, abs=1e-6)

    files = sorted(cache_dir.rglob("*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = run_training(cfg, tmp_path / "second")
    assert second.finished and cache_records(tmp_path / "second") == {}  # nothing to build
    assert {f: f.stat().st_mtime_ns for f in sorted(cache_dir.rglob("*.safetensors"))} == stamps
    assert losses(tmp_path / "second") == losses(tmp_path / "first")

    # One image changes: only its latents are encoded again (its caption, unchanged, stays cached).
    image = Path(cfg.data.path) / "00003.png"
    with Image.open(image) as img:
        img.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    third = run_training(cfg, tmp_path / "third")
    assert third.finished
    rebuilt = cache_records(tmp_path / "third")
    assert (
        set(rebuilt) == {"latents"}
        and rebuilt["latents"]["total"] == 1
        and rebuilt["latents"]["crops"] in (1, 2)
    )


def test_pixel_codec_ignores_latent_cache(make_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = load_config(make_config(cache={"latents": True, "text": True}))
    assert run_training(cfg, tmp_path / "run").finished
    assert not (tmp_path / "run" / "cache" / "latents").exists()
    assert any((tmp_path / "run" / "cache" / "text").rglob("*.safetensors"))
