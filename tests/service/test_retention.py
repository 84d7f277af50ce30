"""Retention and disk on the real stack (uvicorn API + Celery worker, PostgreSQL, Redis, the tiny pixel model):
uploads are stored only for an accepted job, ``DELETE /v1/images/{id}`` removes a job's files, the maintenance loop
removes expired outputs and uploads, /v1/system reports each folder's disk use, and a key over its storage quota gets
507 with nothing written. The API is restarted with the settings each test needs (same database, same folders)."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from service_stack import OTHER_KEY, Stack, drop_queues, own_database, stack_env, stop_group

SMALL = {"width": 32, "height": 32, "steps": 2, "guidance_scale": 1.0, "seed": 3}


def _b64(seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def rstack(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    """A stack of its own; the API starts with the queue limit 1 and no worker (the first test fills the queue)."""
    tmp = tmp_path_factory.mktemp("retention-stack")
    prefix = queue_prefix + "r"
    with own_database(pg_admin) as url:
        s = Stack(stack_env(tmp, assets, url, redis_url, prefix), tmp, OTHER_KEY)
        try:
            s.migrate()
            s.start_api({"HDM_QUEUE_LIMIT": "1"})
            yield s
        finally:
            s.stop()
            drop_queues(redis_url, prefix)


def _restart_api(s: Stack, **env: str) -> None:
    assert s.api is not None
    stop_group(s.api)
    s.start_api(env)


def _uploads(s: Stack) -> Path:
    return Path(s.env["HDM_OUTPUTS_DIR"]) / "uploads"


def test_refused_edit_requests_leave_no_upload(rstack: Stack) -> None:
    s = rstack
    edit = {"prompt": "edit me", **SMALL, "init_image": _b64(1)}
    with s.client() as c:
        cases = [
            ({**edit, "model": "no-such-model"}, 422, "unknown_model"),
            ({**edit, "adapters": [{"id": "no-such-adapter"}]}, 422, "unknown_adapter"),
            ({**edit, "sampler": "nope"}, 422, None),
        ]
        for body, status, code in cases:
            r = c.post("/v1/images", json=body)
            assert r.status_code == status and (code is None or r.json()["error"]["code"] == code), r.text
        files = {"image": ("a.png", base64.b64decode(_b64(2)), "image/png")}
        r = c.post("/v1/images/edits", data={"prompt": "x", "size": "32x32", "model": "nope"}, files=files)
        assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
        queued = c.post("/v1/images", json={"prompt": "fills the queue", **SMALL})
        assert queued.status_code == 202, queued.text  # no worker: it stays queued, the key is at its limit
        r = c.post("/v1/images", json=edit)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        assert _files(_uploads(s)) == []
        r = c.delete(f"/v1/images/{queued.json()['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_active", r.text
        assert c.post(f"/v1/images/{queued.json()['id']}/cancel").status_code == 200
        accepted = c.post("/v1/images", json=edit)  # the same request, accepted now: its upload is written
        assert accepted.status_code == 202, accepted.text
        upload = accepted.json()["request"]["init_image"]
        assert _files(_uploads(s)) == [_uploads(s) / f"{upload}.png"]
        assert c.post(f"/v1/images/{accepted.json()['id']}/cancel").status_code == 200


def test_over_the_storage_quota_a_request_is_refused_and_nothing_written(rstack: Stack) -> None:
    s = rstack
    stored = _files(_uploads(s))
    assert len(stored) == 1  # the accepted upload of the test before: this key stores its bytes
    quota = stored[0].stat().st_size + 100
    _restart_api(s, HDM_KEY_STORAGE_BYTES=str(quota))
    with s.client() as c:
        n_jobs = len(c.get("/v1/images", params={"limit": 100}).json()["data"])
        r = c.post("/v1/images", json={"prompt": "another edit", **SMALL, "init_image": _b64(5)})
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "storage_quota_exceeded" and "HDM_KEY_STORAGE_BYTES allows" in err["message"]
        assert (
            f"allows {quota}" in err["message"]
            and f"stores {stored[0].stat().st_size} bytes" in err["message"]
        )
        assert _files(_uploads(s)) == stored  # nothing written
        assert len(c.get("/v1/images", params={"limit": 100}).json()["data"]) == n_jobs  # no job
        r = c.post("/v1/images", json={"prompt": "text only, under the quota", **SMALL})
        assert r.status_code == 202, r.text  # 0 bytes added and the key is below its quota
        c.post(f"/v1/images/{r.json()['id']}/cancel")
    _restart_api(s)


def test_delete_removes_the_jobs_files_and_system_shows_disk_use(rstack: Stack) -> None:
    s = rstack
    s.start_worker(0)
    outputs = Path(s.env["HDM_OUTPUTS_DIR"])
    with s.client(timeout=90) as c:
        r = c.post(
            "/v1/images",
            json={"prompt": "kept", **SMALL, "init_image": _b64(7)},
            headers={"Prefer": "wait=60"},
        )
        job = s.wait_job(r.json()["id"], timeout=90)
        assert job["status"] == "succeeded", job
        upload = _uploads(s) / f"{job['request']['init_image']}.png"
        out = outputs / job["id"]
        assert upload.is_file() and _files(out)
        disk = c.get("/v1/system").json()["disk"]
        assert set(disk) == {"uploads", "outputs", "models", "runs", "data"}
        for name, folder in (("uploads", _uploads(s)), ("models", Path(s.env["HDM_MODELS_DIR"]))):
            assert disk[name]["bytes"] == sum(f.stat().st_size for f in _files(folder)), name
            assert disk[name]["files"] == len(_files(folder)) and disk[name]["free_bytes"] > 0
        not_uploads = [f for f in _files(outputs) if _uploads(s) not in f.parents]
        assert disk["outputs"]["bytes"] == sum(f.stat().st_size for f in not_uploads)  # uploads not twice
        r = c.delete(f"/v1/images/{job['id']}")
        assert r.status_code == 200 and r.json()["files_deleted"] == 2, r.text
        assert not out.exists() and not upload.exists()
        assert c.get(f"/v1/images/{job['id']}").status_code == 404


def test_the_maintenance_loop_removes_expired_outputs_and_uploads(rstack: Stack) -> None:
    s = rstack
    ttl_s = 5.0
    _restart_api(s, HDM_OUTPUTS_TTL_DAYS=str(ttl_s / 86400), HDM_UPLOADS_TTL_HOURS=str(ttl_s / 3600))
    outputs = Path(s.env["HDM_OUTPUTS_DIR"])
    with s.client(timeout=90) as c:
        r = c.post(
            "/v1/images",
            json={"prompt": "expires", **SMALL, "init_image": _b64(9)},
            headers={"Prefer": "wait=60"},
        )
        job = s.wait_job(r.json()["id"], timeout=90)
        assert job["status"] == "succeeded", job
        upload = _uploads(s) / f"{job['request']['init_image']}.png"
        out = outputs / job["id"] / "0.png"
        assert upload.is_file() and out.is_file()
        # an upload a queued job still needs outlives its TTL: no worker takes this one
        for p in list(s.workers):
            s.kill_worker(p)
        waiting = c.post("/v1/images", json={"prompt": "waits", **SMALL, "init_image": _b64(10)}).json()
        needed = _uploads(s) / f"{waiting['request']['init_image']}.png"
        os.utime(needed, (time.time() - 10 * ttl_s,) * 2)  # older than the TTL already
        deadline = time.monotonic() + 60
        while (out.exists() or upload.exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not out.exists() and not upload.exists(), "the maintenance loop did not remove expired files"
        assert needed.is_file()
        view = c.get(f"/v1/images/{job['id']}").json()
        assert view["status"] == "succeeded" and view["images"] == []
        assert c.get(f"/v1/images/{job['id']}/files/0").status_code == 404
        c.post(f"/v1/images/{waiting['id']}/cancel")
    _restart_api(s)


@pytest.mark.parametrize("name", ["HDM_OUTPUTS_TTL_DAYS", "HDM_UPLOADS_TTL_HOURS", "HDM_KEY_STORAGE_BYTES"])
def test_retention_and_quota_settings_are_validated(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv(name, "-1")
    with pytest.raises(ValidationError, match=name.removeprefix("HDM_").lower()):
        Settings()
    monkeypatch.setenv(name, "0.5" if "TTL" in name else "1000")
    assert getattr(Settings(), name.removeprefix("HDM_").lower()) == (0.5 if "TTL" in name else 1000)
