"""Ownership on the real stack (uvicorn API + Celery worker + the real trainer, PostgreSQL, Redis): one rule for
models and adapters (app/services/registry.py). Shared items are deleted by admin keys only (403 naming the rule for
a plain key); a key's private adapters, trained by its adapter job, stay deleted for every key after an API restart
(the start-up scan) and after the job is resumed (the supervisor registering the run's adapters again); plain keys
never see the server's absolute paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from service_stack import (
    ADMIN_KEY,
    API_KEY,
    OTHER_KEY,
    ROOT,
    Stack,
    drop_queues,
    own_database,
    stack_env,
    stop_group,
)
from test_adapters import _adapter, _base_model, _train_body

import hdm_core
from hdm_core.adapters.network import AdapterConfig
from hdm_core.codec import PixelCodec

KEYS = (API_KEY, OTHER_KEY, ADMIN_KEY)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: the base model, a second (shared) model and a shared adapter, found by the start-up scan."""
    models = tmp_path_factory.mktemp("own-models")
    base = models / "own-base.safetensors"
    hdm_core.save_checkpoint(base, _base_model(), codec=PixelCodec())
    shutil.copy(base, models / "own-spare.safetensors")
    _adapter(base, _base_model(), AdapterConfig(), models / "adapters" / "own-shared.safetensors", seed=1)
    return models


@pytest.fixture(scope="module")
def ostack(
    tmp_path_factory: pytest.TempPathFactory,
    folder: Path,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("own-stack")
    prefix = queue_prefix + "o"
    with own_database(pg_admin) as url:
        s = Stack(stack_env(tmp, {**assets, "models": folder}, url, redis_url, prefix), tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            s.start_worker(0)
            yield s
        finally:
            s.stop()
            drop_queues(redis_url, prefix)


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


def test_shared_items_are_deleted_by_admin_keys_only(ostack: Stack, folder: Path) -> None:
    s = ostack
    shared_file = folder / "adapters" / "own-shared.safetensors"
    spare_file = folder / "own-spare.safetensors"
    with s.client() as plain, s.client(ADMIN_KEY) as admin:
        adapter = plain.get("/v1/adapters/own-shared").json()
        model = plain.get("/v1/models/own-spare").json()
        # a plain key sees paths relative to the service's folders; an admin key the server's own
        assert adapter["path"] == "models/adapters/own-shared.safetensors"
        assert model["path"] == "models/own-spare.safetensors" and model["shared"]
        assert admin.get(f"/v1/adapters/{adapter['id']}").json()["path"] == str(shared_file.resolve())
        for what, url in (
            ("Adapter", f"/v1/adapters/{adapter['id']}"),
            ("Model", f"/v1/models/{model['id']}"),
        ):
            err = _error(plain.delete(url), 403, "admin_required")
            assert err["message"].startswith(f"{what} ") and (
                "shared items (no owner) are changed and deleted by admin keys" in err["message"]
            ), err
        assert shared_file.is_file() and spare_file.is_file()  # the refusal changed nothing
        assert plain.get(f"/v1/adapters/{adapter['id']}").status_code == 200
        r = admin.delete(f"/v1/adapters/{adapter['id']}")
        assert r.status_code == 200 and r.json()["file_deleted"] is True, r.text
        r = admin.delete(f"/v1/models/{model['id']}")
        assert r.status_code == 200 and r.json()["file_deleted"] is True, r.text
        assert not shared_file.exists() and not spare_file.exists()  # inside the models folder: removed
        assert plain.get(f"/v1/adapters/{adapter['id']}").status_code == 404


def _job_adapters(s: Stack, key: str, job_id: str) -> dict[str, str]:
    with s.client(key) as c:
        rows = c.get("/v1/adapters").json()["data"]
    return {a["name"].removeprefix(f"{job_id}-"): a["id"] for a in rows if a["train_job"] == job_id}


def _dataset(s: Stack) -> str:
    root = Path(s.env["HDM_DATA_ROOT"]) / "own-squares"
    root.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate([(220, 30, 30), (30, 30, 220)] * 4):
        Image.new("RGB", (32, 32), rgb).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text("a zq square")
    with s.client() as c:
        ds = c.post("/v1/datasets", json={"name": "own", "path": "own-squares"}).json()
        assert ds["path"] == "data/own-squares", ds  # not the server's data root
    ready = s.wait_job(ds["id"], path="/v1/datasets", statuses=("ready", "invalid"), timeout=120)
    assert ready["status"] == "ready", ready
    return str(ds["id"])


def test_deleted_private_adapters_stay_deleted_after_restart_and_resume(ostack: Stack, folder: Path) -> None:
    s = ostack
    with s.client() as c:
        body = _train_body(_dataset(s), base_model="own-base")
        r = c.post("/v1/train-jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    done = s.wait_job(job_id, timeout=300, path="/v1/train-jobs")
    assert done["status"] == "succeeded", (done, s.logs())
    mine = _job_adapters(s, API_KEY, job_id)
    assert set(mine) == {"step-00000002", "step-00000004", "final"}, mine
    assert _job_adapters(s, OTHER_KEY, job_id) == {}  # private: another key neither sees nor deletes them
    with s.client(OTHER_KEY) as other:
        _error(other.delete(f"/v1/adapters/{mine['final']}"), 404, "not_found")
    with s.client(ADMIN_KEY) as admin:
        files = {n: Path(admin.get(f"/v1/adapters/{i}").json()["path"]) for n, i in mine.items()}
    with s.client() as c:
        shown = c.get(f"/v1/adapters/{mine['final']}").json()["path"]
        assert shown == f"runs/{job_id}/final_adapter.safetensors", shown
        for name in ("step-00000004", "final"):
            r = c.delete(f"/v1/adapters/{mine[name]}")
            assert r.status_code == 200 and r.json()["file_deleted"] is True, r.text
            assert not files[name].exists()
    # the same file back where the scan looks (a backup restore, a sync job): the tombstone keeps it out
    snapshot = Path(s.env["HDM_RUNS_DIR"]) / job_id / "checkpoints" / "step-00000004" / "adapter.safetensors"
    shutil.copy(snapshot, files["step-00000004"])
    # a run's adapter its supervisor copied but never registered (it died in between): the scan gives it to the
    # job's key, not to everyone
    shutil.copy(files["step-00000002"], files["step-00000002"].with_name("step-00000006.safetensors"))
    assert s.api is not None
    stop_group(s.api)
    s.start_api()
    _assert_left(s, job_id, {"step-00000002", "step-00000006"})
    # the job resumes (as after a failure at its end): its supervisor walks the run's manifest and finals again
    engine = sa.create_engine(s.env["HDM_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET status = 'failed' WHERE id = :id"), {"id": job_id})
    engine.dispose()
    with s.client() as c:
        r = c.post(f"/v1/train-jobs/{job_id}/resume")
        assert r.status_code == 202, r.text
    resumed = s.wait_job(
        job_id, timeout=300, path="/v1/train-jobs", pred=lambda j: j["attempts"] > done["attempts"]
    )
    assert resumed["status"] == "succeeded", (resumed, s.logs())
    _assert_left(s, job_id, {"step-00000002", "step-00000006"})


def _assert_left(s: Stack, job_id: str, left: set[str]) -> None:
    """The owner (and admin keys) see the job's adapters nobody deleted; any other key sees none."""
    for key in KEYS:
        expected = set() if key == OTHER_KEY else left
        assert set(_job_adapters(s, key, job_id)) == expected, key
        with s.client(key) as c:
            for name in ("step-00000004", "final"):
                assert c.get(f"/v1/adapters/{job_id}-{name}").status_code == 404, (key, name)


def test_import_respects_a_tombstone_unless_revived(ostack: Stack, folder: Path, tmp_path: Path) -> None:
    """`hdm adapters import` of a deleted adapter's file is refused; with --revive it is registered again."""
    s = ostack
    path = _adapter(
        folder / "own-base.safetensors", _base_model(), AdapterConfig(), folder / "revived.safetensors", 4
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "app.cli", "adapters", "import", str(path), *args]
        return subprocess.run(cmd, env=s.env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    first = cli()
    assert first.returncode == 0, first.stderr
    adapter_id = first.stdout.split()[0]
    with s.client(ADMIN_KEY) as admin:
        assert admin.delete(f"/v1/adapters/{adapter_id}").status_code == 200
    assert not path.exists()
    _adapter(folder / "own-base.safetensors", _base_model(), AdapterConfig(), path, 4)
    refused = cli()
    assert refused.returncode == 2 and "deleted adapter" in refused.stderr, refused.stderr
    revived = cli("--revive")
    assert revived.returncode == 0, revived.stderr
    with s.client() as c:
        assert (
            c.get(f"/v1/adapters/{revived.stdout.split()[0]}").json()["path"] == "models/revived.safetensors"
        )
