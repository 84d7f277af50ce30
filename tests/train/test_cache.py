"""Training caches ([cache]): built once, reused by the next run, one changed image re-encoded alone, and the same
losses as encoding online (a tiny real diffusers AutoencoderKL and the toy text encoder)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from hdm_core.data.cache import TensorStore
from hdm_core.train import run_training
from hdm_core.train.config import load_config

from .conftest import REPO, TINY_MODEL, read_metrics


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

    def make(name: str, *, micro: int = 1, grad_accum: int = 1, **cache: object) -> Path:
        """Global batches 4 (16 px) then 2 (32 px), as micro-batches of 4/micro and 2/micro x grad_accum per rank
        (micro = grad_accum x ranks keeps every run on the same sample stream)."""
        stage = {"lr": 0.5, "grad_accum": grad_accum}
        return make_config(
            f"{name}.toml",
            model={**TINY_MODEL, "overrides": {**TINY_MODEL["overrides"], "in_channels": 4}},
            codec={"kind": "vae", "path": str(vae)},
            data={"path": str(data), "num_workers": 0},
            cache=cache,
            train={"checkpoint_every": 100, "keep_last_n": 1, "num_threads": 1},
            stages=[
                {**stage, "resolution": 16, "batch_size": 4 // micro, "steps": 6, "tread_rate": 0.5},
                {**stage, "resolution": 32, "batch_size": 2 // micro, "steps": 3, "caption_dropout": 0.5},
            ],
        )

    return make


def cache_records(run: Path) -> dict[str, dict]:
    """The last progress record of each cache ("latents", "text") the run built."""
    return {r["cache"]: r for r in read_metrics(run) if r.get("kind") == "cache" and r["cache"] != "built"}


def built_per_rank(run: Path) -> dict[str, list[int]]:
    """The run's one "built" record: how many records (crops, caption variants) each rank encoded."""
    (rec,) = [r for r in read_metrics(run) if r.get("kind") == "cache" and r["cache"] == "built"]
    return {"latents": rec["latents"], "text": rec["text"]}


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
    assert built_per_rank(tmp_path / "first") == {"latents": [30], "text": [built["text"]["total"]]}
    # Cached latents are sampled from the stored Gaussian with the step's seed, as the VAE's encode samples them;
    # the only difference is the encoder's batch (one image vs the micro-batch): float rounding.
    assert losses(tmp_path / "first") == pytest.approx(losses(tmp_path / "ref"), rel=1e-4, abs=1e-6)

    files = sorted(cache_dir.rglob("*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = run_training(cfg, tmp_path / "second")
    assert second.finished and cache_records(tmp_path / "second") == {}  # nothing to build
    assert built_per_rank(tmp_path / "second") == {"latents": [0], "text": [0]}
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


def test_two_ranks_each_build_half_of_the_cache(vae_run: Callable[..., Path], tmp_path: Path) -> None:
    """2 ranks (real torchrun, gloo) plan the same records as one process on the same sample stream, each encodes
    about half of them (no file twice), and the run's losses are those of the single process."""
    single_dir, ddp_dir = tmp_path / "cache-single", tmp_path / "cache-ddp"
    single_cfg = vae_run("single", micro=2, grad_accum=2, latents=True, text=True, dir=str(single_dir))
    assert run_training(load_config(single_cfg), tmp_path / "single").finished
    want = built_per_rank(tmp_path / "single")
    ddp_cfg = vae_run("ddp", micro=2, latents=True, text=True, dir=str(ddp_dir))
    ddp = torchrun(2, ddp_cfg, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    got = built_per_rank(tmp_path / "ddp")
    for kind in ("latents", "text"):
        (total,) = want[kind]
        assert len(got[kind]) == 2 and sum(got[kind]) == total, (kind, got, want)
        # 24 images (30 crops) and ~30 caption variants, dealt out key by key in the order the run reads them
        assert all(0.35 * total <= n <= 0.65 * total for n in got[kind]), (kind, got)
    relative = {p.relative_to(single_dir) for p in single_dir.rglob("*.safetensors")}
    assert {p.relative_to(ddp_dir) for p in ddp_dir.rglob("*.safetensors")} == relative
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    again = torchrun(2, ddp_cfg, tmp_path / "ddp-again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert built_per_rank(tmp_path / "ddp-again") == {"latents": [0, 0], "text": [0, 0]}


def test_cache_reads_are_memory_maps_released_with_the_batch(tmp_path: Path) -> None:
    """An entry is a view of its file's memory map (no copy), and the store keeps nothing once the batch is gone."""
    store = TensorStore(tmp_path / "store")
    store.add("ab" + "0" * 62, {"x": torch.arange(4096, dtype=torch.float32)})
    path = str(store.path("ab" + "0" * 62))
    entry = store.get("ab" + "0" * 62, "x")
    assert entry is not None and torch.equal(entry, torch.arange(4096, dtype=torch.float32))
    assert mapped_file(entry.data_ptr()) == path
    del entry
    gc.collect()
    assert path not in Path("/proc/self/maps").read_text()
    assert store.get("ab" + "0" * 62, "missing") is None and store.get("cd" + "0" * 62, "x") is None


def mapped_file(address: int) -> str | None:
    """The file of the memory mapping that holds `address` (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address range, perms, offset, device, inode[, path]
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def torchrun(nproc: int, config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, "-m", "hdm_core.train", str(config), "--run-dir", str(run_dir)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
