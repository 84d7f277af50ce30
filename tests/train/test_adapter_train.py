"""Adapter runs ([adapter]): frozen base, adapter-only snapshots, bit-exact resume after SIGKILL, previews."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hdm_core import XUT, load_checkpoint, save_checkpoint
from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.files import file_sha256, load_adapter
from hdm_core.codec import PixelCodec
from hdm_core.pipeline import HDMPipeline
from hdm_core.train import run_training
from hdm_core.train.config import load_config

from .conftest import REPO, read_metrics, train_cli
from .test_train import read_metrics_tolerant


@pytest.fixture
def base_ckpt(make_config: Callable[..., Path], tmp_path: Path) -> Path:
    arch = load_config(make_config("probe.toml")).resolve_model_config()
    assert arch is not None
    torch.manual_seed(3)
    model = XUT(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised output layers too: a "trained" base
    return save_checkpoint(tmp_path / "base.safetensors", model, codec=PixelCodec())


def test_sigkill_then_resume_matches_uninterrupted_adapter_run(
    make_config: Callable[..., Path], base_ckpt: Path, tmp_path: Path
) -> None:
    """bf16 autocast + gradient checkpointing over the frozen base; killed mid-stage, resumed, same bits."""
    cfg = make_config(
        model={"init_from": str(base_ckpt), "gradient_checkpointing": True},
        adapter={"trigger_words": ["zq"], "base_name": "tiny-base"},
        train={"checkpoint_every": 3, "keep_last_n": 2, "num_threads": 1, "precision": "bf16"},
        stages=[{"resolution": 16, "batch_size": 2, "grad_accum": 2, "steps": 12, "tread_rate": 0.5}],
    )
    ref = train_cli(str(cfg), "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hdm_core.train", str(cfg), "--run-dir", str(run)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "final_adapter.safetensors").exists()
    assert 7 <= len(read_metrics_tolerant(run)) < 12
    resumed = train_cli(str(cfg), "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref_log, new_log = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in new_log] == list(range(1, 13))
    key = [(r["loss"], r["lr"], r["grad_norm"]) for r in ref_log]
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in new_log] == key
    a = load_file(tmp_path / "ref" / "final_adapter.safetensors")
    b = load_file(run / "final_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The files are fp16 (the default save_dtype); the resumed run continued from the state's fp32 weights (from
    # the rounded file its losses above would differ).
    assert {v.dtype for v in b.values()} == {torch.float16}
    assert ref_log[0]["lr"] == pytest.approx(0.1 / 2)  # the recipe's lr 0.1 (no stage lr), warmup 2

    # Snapshots hold the adapter and the training state, never a model copy; the manifest says what it is.
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    last = manifest[-1]
    assert last["step"] == 12 and set(last["files"]) == {"adapter.safetensors", "training_state.pt"}
    assert last["kind"] == "adapter"
    info = last["adapter"]
    assert info["file"] == "adapter.safetensors" and info["algorithm"] == "lokr" and info["steps"] == 12
    assert info["dtype"] == "fp16"
    assert info["base_model"] == "tiny-base" and info["base_sha256"] == file_sha256(base_ckpt)
    assert info["trigger_words"] == ["zq"] and info["caption_sample"].startswith("a ")
    assert not list(run.rglob("model.safetensors")) and not (run / "final.safetensors").exists()
    loaded = load_adapter(run / "checkpoints" / last["name"] / "adapter.safetensors")
    assert loaded.info.steps == 12 and loaded.info.base_sha256 == info["base_sha256"]
    assert all(torch.equal(loaded.tensors[k], b[k]) for k in b)
    # The adapter changed the model, and it is small next to the base.
    base = load_checkpoint(base_ckpt).model.eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5])
    with torch.no_grad():
        before = base(x, t, ctx)
        with apply_adapters(base, [(loaded, 1.0)]):
            after = base(x, t, ctx)
        assert float((after - before).abs().max()) > 1e-3
        assert torch.equal(base(x, t, ctx), before)


def test_adapter_run_trains_only_the_adapter_and_previews_use_it(
    make_config: Callable[..., Path], base_ckpt: Path, tmp_path: Path
) -> None:
    prompt = "a red circle at the center on a white background"
    cfg = load_config(
        make_config(
            model={"init_from": str(base_ckpt)},
            adapter={"algorithm": "lora", "rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
            sampling={"every": 3, "prompts": [prompt], "steps": 3},
            train={"checkpoint_every": 3, "keep_last_n": 1, "num_threads": 1},
            stages=[{"resolution": 16, "batch_size": 2, "steps": 3, "lr": 2.0}],
            schedule={"warmup_steps": 0},
        )
    )
    result = run_training(cfg, tmp_path / "run")
    assert result.finished
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-00000003" / "training_state.pt", weights_only=True
    )
    names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]
    assert names and all(n.startswith("lycoris_") for n in names)  # the adapter, nothing of the base
    adapter = load_adapter(tmp_path / "run" / "final_adapter.safetensors")
    assert adapter.config.algorithm == "lora" and adapter.info.steps == 3
    assert {v.dtype for v in adapter.tensors.values()} == {torch.float32}  # save_dtype = "fp32"
    preview = np.asarray(
        Image.open(tmp_path / "run" / "samples" / "step-00000003.png").convert("RGB"), np.int16
    )
    pipe = HDMPipeline.from_paths(base_ckpt, cfg.text_encoder.path)
    pipe.text_length = cfg.text_encoder.max_length  # as the preview pads (the bare base file records none)

    def draw() -> np.ndarray:
        img = pipe.generate([prompt], width=16, height=16, steps=3, guidance_scale=3.0, seed=0).images[0]
        return np.asarray(img, np.int16)

    base_img = draw()
    with apply_adapters(pipe.model, [(adapter, 1.0)]):
        adapted = draw()
    # The preview is base + adapter (hooked in training, merged here: equal up to rounding), not the base.
    assert np.abs(preview - adapted).max() <= 2
    assert np.abs(preview - base_img).max() > 10
