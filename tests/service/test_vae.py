"""HDM_VAE: latent-model train jobs are refused up front without a VAE; image jobs on a checkpoint that carries no
VAE decode with the server's VAE folder."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_stack import ADMIN_KEY, ROOT, Stack


@pytest.fixture(scope="module")
def latent_checkpoint(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A tiny latent (4-channel) XUT saved without a codec, registered through `hdm models import`, and a tiny
    diffusers AutoencoderKL folder."""
    import torch
    from diffusers import AutoencoderKL

    import hdm_core

    base = tmp_path_factory.mktemp("latent")
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
    ).save_pretrained(base / "vae")
    path = base / "latent-novae.safetensors"
    hdm_core.save_checkpoint(path, hdm_core.XUT(hdm_core.PRESETS["xut-debug"]))
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "models", "import", str(path), "--name", "latent-novae"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    model_id = out.stdout.split()[0]
    yield model_id, base / "vae"
    # a shared (operator-imported) model outside the service's folders: an admin key deletes it, explicitly
    with stack.client(key=ADMIN_KEY) as c:
        r = c.delete(f"/v1/models/{model_id}", params={"confirm_outside": "true"})
        assert r.status_code in (200, 204), r.text


def test_latent_train_job_without_vae_is_refused(stack: Stack, latent_checkpoint: tuple[str, Path]) -> None:
    from test_training import _train_body  # the dataset id is only checked after the body's own rules

    with stack.client() as c:
        ds = c.post("/v1/datasets", json={"name": "vae-check", "path": "."}).json()["id"]
        r = c.post("/v1/train-jobs", json={**_train_body(ds, 8), "arch": "xut-debug"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "vae_required" and err["param"] == "arch" and "HDM_VAE" in err["message"]
        body = {**_train_body(ds, 8), "base_model": latent_checkpoint[0]}
        body.pop("arch")
        r = c.post("/v1/train-jobs", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == "base_model", r.text
        # pixel space needs no VAE
        assert (
            c.post("/v1/train-jobs", json={**_train_body(ds, 8), "nodes": 2}).json()["error"]["param"]
            == "nodes"
        )


def test_image_job_on_checkpoint_without_vae_uses_hdm_vae(
    stack: Stack, latent_checkpoint: tuple[str, Path]
) -> None:
    model_id, vae = latent_checkpoint
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    stack.start_worker(0, extra_env={"HDM_VAE": str(vae)})
    try:
        with stack.client() as c:
            r = c.post(
                "/v1/images",
                json={"prompt": "latent", "model": model_id, "width": 32, "height": 32, "steps": 2},
                headers={"Prefer": "wait=60"},
            )
            job = r.json()
            assert r.status_code == 200 and job["status"] == "succeeded", (r.text, stack.logs())
            assert job["images"][0]["width"] == 32
    finally:
        for p in list(stack.workers):
            stack.kill_worker(p, signal.SIGTERM)
        stack.start_worker(0)
