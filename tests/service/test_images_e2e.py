"""Image jobs through HTTP against the real stack (uvicorn + PostgreSQL + Redis + Celery worker)."""

from __future__ import annotations

import io
import time
from pathlib import Path

from PIL import Image
from service_stack import ADMIN_KEY, Stack

SMALL = {"width": 32, "height": 32, "steps": 2, "guidance_scale": 3.0}


def test_image_job_queued_running_succeeded(live_worker: Stack) -> None:
    s = live_worker
    with s.client() as c:
        r = c.post(
            "/v1/images",
            json={"prompt": "a red circle", "negative_prompt": "blurry", "seed": 1234, "n": 2, **SMALL},
        )
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/images/{job['id']}"
        assert job["id"].startswith("img_") and job["object"] == "image_job"
        assert job["status"] in ("queued", "running")
        assert job["request"]["seed"] == 1234 and job["request"]["n"] == 2
        done = s.wait_job(job["id"])
        assert done["status"] == "succeeded", done
        assert done["started_at"] and done["finished_at"]
        assert [im["seed"] for im in done["images"]] == [1234, 1235]
        assert done["progress"] == {"step": 2, "total": 2}
        assert done["timings"]["sample_s"] is not None and done["timings"]["queued_s"] is not None
        statuses = [
            e["data"].get("status")
            for e in c.get(f"/v1/images/{job['id']}/events").json()["data"]
            if e["type"] == "status"
        ]
        assert statuses == ["queued", "running", "succeeded"]
        r = c.get(f"/v1/images/{job['id']}/files/1")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (32, 32)
        params = img.text["parameters"]
        assert params.startswith("a red circle\nNegative prompt: blurry\n")
        assert "Seed: 1235" in params and "Steps: 2" in params and "Size: 32x32" in params
        assert "Model: tiny" in params and "Camera: x_shift 0.0 y_shift 0.0 zoom 1.0" in params
        assert c.get(f"/v1/images/{job['id']}/files/2").status_code == 404


def test_prefer_wait_returns_finished_job(live_worker: Stack) -> None:
    with live_worker.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/images", json={"prompt": "wait for me", **SMALL}, headers={"Prefer": "wait=30"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "succeeded"
        assert time.monotonic() - t0 < 30


def test_same_seed_reproduces_image(live_worker: Stack) -> None:
    with live_worker.client() as c:
        a = c.post(
            "/v1/images", json={"prompt": "same", "seed": 7, "n": 2, **SMALL}, headers={"Prefer": "wait=30"}
        )
        b = c.post("/v1/images", json={"prompt": "same", "seed": 8, **SMALL}, headers={"Prefer": "wait=30"})
        assert a.status_code == b.status_code == 200
        # image 1 of the first job used seed 8: the same pixels as image 0 of a job with seed 8 alone
        pa = Image.open(io.BytesIO(c.get(f"/v1/images/{a.json()['id']}/files/1").content)).tobytes()
        pb = Image.open(io.BytesIO(c.get(f"/v1/images/{b.json()['id']}/files/0").content)).tobytes()
        assert pa == pb


def test_webp_and_jpeg_carry_parameters_in_exif(live_worker: Stack) -> None:
    with live_worker.client() as c:
        for fmt, mime in (("webp", "image/webp"), ("jpeg", "image/jpeg")):
            r = c.post(
                "/v1/images",
                json={"prompt": f"exif {fmt}", "output_format": fmt, "seed": 9, **SMALL},
                headers={"Prefer": "wait=30"},
            )
            assert r.json()["status"] == "succeeded", r.text
            f = c.get(f"/v1/images/{r.json()['id']}/files/0")
            assert f.headers["content-type"] == mime
            img = Image.open(io.BytesIO(f.content))
            comment = img.getexif().get_ifd(0x8769)[0x9286]
            text = comment[8:].decode("utf-16-be")
            assert (
                comment.startswith(b"UNICODE\x00") and text.startswith(f"exif {fmt}\n") and "Seed: 9" in text
            )


def test_model_import_and_delete_refused_while_in_use(stack: Stack, tmp_path: Path) -> None:
    import shutil
    import signal
    import subprocess
    import sys

    from service_stack import ROOT

    src = Path(stack.env["HDM_MODELS_DIR"]) / "tiny.safetensors"
    copy = tmp_path / "imported.safetensors"
    shutil.copyfile(src, copy)
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "models", "import", str(copy), "--name", "imported"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    )
    model_id = out.stdout.split()[0]
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    with stack.client() as c:
        m = c.get(f"/v1/models/{model_id}").json()
        assert m["name"] == "imported" and m["path"] == copy.name  # a plain key never sees server paths
        job = c.post("/v1/images", json={"prompt": "uses it", "model": "imported", **SMALL}).json()
        assert job["model"] == {"id": model_id, "name": "imported"}
    # a shared model (imported by the operator) is deleted by an admin key; its file lies outside the service's
    # folders, so the delete says so explicitly
    with stack.client(key=ADMIN_KEY) as admin, stack.client() as c:
        outside = {"confirm_outside": "true"}
        r = admin.delete(f"/v1/models/{model_id}", params=outside)
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use"
        c.post(f"/v1/images/{job['id']}/cancel")
        assert admin.delete(f"/v1/models/{model_id}", params=outside).json()["deleted"] is True
        assert c.get(f"/v1/models/{model_id}").status_code == 404


def test_model_cache_hit_and_eviction(live_worker: Stack, tmp_path: Path) -> None:
    """One pipeline per worker: the same model twice is a cache hit; another model evicts it."""
    import shutil
    import subprocess
    import sys

    from service_stack import ROOT

    copy = tmp_path / "second.safetensors"
    shutil.copyfile(Path(live_worker.env["HDM_MODELS_DIR"]) / "tiny.safetensors", copy)
    subprocess.run(
        [sys.executable, "-m", "app.cli", "models", "import", str(copy), "--name", "second"],
        cwd=ROOT,
        env=live_worker.env,
        capture_output=True,
        check=True,
    )
    hits = []
    with live_worker.client() as c:
        for model in ("tiny", "tiny", "second", "second", "tiny"):
            r = c.post(
                "/v1/images", json={"prompt": "cache", "model": model, **SMALL}, headers={"Prefer": "wait=60"}
            )
            assert r.json()["status"] == "succeeded", r.text
            hits.append(r.json()["model_cache_hit"])
    assert hits[1:] == [True, False, True, False], hits


def test_a_models_own_tuned_schedule_reaches_the_running_worker(
    live_worker: Stack, assets: dict[str, Path]
) -> None:
    """`hdm tune-schedule`'s file beside the checkpoint: the worker holding the model uses it from its next job on,
    and the image's parameters text names the times that drew it."""
    from hdm_core.samplers.schedules import TunedSchedule, schedule_file, write_tuned_schedule

    def times(schedule: str) -> str:
        body = {
            "prompt": "own times",
            "seed": 3,
            "sampler": "unipc",
            "schedule": schedule,
            **SMALL,
            "steps": 4,
        }
        with live_worker.client() as c:
            r = c.post("/v1/images", json=body, headers={"Prefer": "wait=30"})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            params = Image.open(io.BytesIO(c.get(f"/v1/images/{r.json()['id']}/files/0").content)).text
        fields = dict(f.split(": ", 1) for f in params["parameters"].splitlines()[-1].split(", "))
        return fields.get("Schedule times", "")

    try:
        schedule_file(assets["model"]).unlink(missing_ok=True)
        assert times("tuned") == "1 0.7939 0.4688 0.1596 0"  # the shipped knots, read off at 4 steps
        write_tuned_schedule(
            assets["model"], TunedSchedule({"unipc": (1.0, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1, 0.0)})
        )
        assert times("tuned") == "1 0.8 0.5 0.2 0"
        write_tuned_schedule(assets["model"], TunedSchedule({"dpmpp_2m": (1.0, 0.95, 0.7, 0.65, 0.0)}))
        assert times("tuned") == "1 0.95 0.7 0.65 0"  # a sampler not searched takes the first one's
        assert times("karras") == ""  # a formula of the steps: not written
    finally:
        schedule_file(assets["model"]).unlink(missing_ok=True)
