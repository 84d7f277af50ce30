"""The model registry over the real stack (issue 10 items 5-7): an explicit, stable default model; deleting a model
frees its file and it stays deleted across the start-up scan (which follows no symlinks); fine-tunes are per key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_stack import ADMIN_KEY, OTHER_KEY, ROOT, Stack
from test_api_contract import SMALL, _assert_error

# image jobs here must reach a final state (a queued job holds its model and counts against the key's limit)
pytestmark = pytest.mark.usefixtures("live_worker")


def _py(stack: Stack, code: str) -> str:
    """Run service code in a process of its own with the stack's settings (what `hdm` commands and workers do)."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _import(stack: Stack, path: Path, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "models", "import", str(path), "--name", name],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()[0]


def _scan(stack: Stack) -> None:
    """The start-up scan of the models folder, as the API runs it when it starts."""
    _py(
        stack,
        "from app.db import session_scope\nfrom app.services.models import scan_models_dir\n"
        "with session_scope() as s: scan_models_dir(s)",
    )


def _names(stack: Stack, key: str = ADMIN_KEY) -> list[str]:
    with stack.client(key=key) as c:
        return [m["name"] for m in c.get("/v1/models").json()["data"]]


def _image_model(stack: Stack, body: dict) -> str:
    with stack.client() as c:
        r = c.post("/v1/images", json={"prompt": "which model", **SMALL, **body})
        assert r.status_code == 202, r.text
        c.post(f"/v1/images/{r.json()['id']}/cancel")
    stack.wait_job(r.json()["id"])  # final before the test deletes the model (a running job holds it: 409)
    return str(r.json()["model"]["name"])


def test_default_model_is_explicit_and_stable(stack: Stack, assets: dict[str, Path], tmp_path: Path) -> None:
    newer = shutil.copy(assets["model"], tmp_path / "newer.safetensors")
    newer_id = _import(stack, Path(newer), "newer")  # registered after tiny: the newest model
    try:
        assert _image_model(stack, {}) == "tiny"  # a new registration does not become the default
        with stack.client() as c:
            listing = c.get("/v1/models").json()
            tiny = next(m for m in listing["data"] if m["name"] == "tiny")
            assert listing["default_model"] == tiny["id"] and tiny["default"] is True
            _assert_error(c.post(f"/v1/models/{newer_id}/default"), 403, code="admin_required")
        with stack.client(key=ADMIN_KEY) as admin:
            r = admin.post(f"/v1/models/{newer_id}/default")
            assert r.status_code == 200 and r.json()["default"] is True, r.text
        assert _image_model(stack, {}) == "newer"
        assert _image_model(stack, {"model": "tiny"}) == "tiny"
    finally:
        with stack.client(key=ADMIN_KEY) as admin:
            assert admin.post(f"/v1/models/{tiny['id']}/default").status_code == 200
            r = admin.delete(f"/v1/models/{newer_id}", params={"confirm_outside": True})
            assert r.status_code == 200, r.text
    assert not Path(newer).exists()


def test_deleted_model_frees_its_file_and_stays_deleted(
    stack: Stack, assets: dict[str, Path], tmp_path: Path
) -> None:
    models = assets["models"]
    inside = Path(shutil.copy(assets["model"], models / "extra.safetensors"))
    outside = Path(shutil.copy(assets["model"], tmp_path / "outside.safetensors"))
    (models / "linked.safetensors").symlink_to(outside)  # a symlink out of the folder is not registered
    (models / "cycle").symlink_to(models, target_is_directory=True)  # nor walked around in circles
    try:
        _scan(stack)
        assert "extra" in _names(stack) and "linked" not in _names(stack)
        assert not any(n.startswith(("cycle", "tiny-")) for n in _names(stack))
        with stack.client() as c:  # a shared model is the admin's to delete
            _assert_error(c.delete("/v1/models/extra"), 403, code="admin_required")
        with stack.client(key=ADMIN_KEY) as admin:
            r = admin.delete("/v1/models/extra")
            assert r.status_code == 200 and r.json()["file_deleted"] is True, r.text
            assert not inside.exists()  # the disk is freed
            shutil.copy(assets["model"], inside)  # the same file again (a sync job, a backup restore)
            _scan(stack)
            _assert_error(admin.get("/v1/models/extra"), 404)  # still deleted: the scan skips its tombstone
            imp = admin.post("/v1/models/import", json={"path": "extra.safetensors"})
            _assert_error(imp, 409, param="revive", code="deleted_item")  # an import respects it too
            imp = admin.post("/v1/models/import", json={"path": "extra.safetensors", "revive": True})
            assert imp.status_code == 200 and imp.json()["name"] == "extra", imp.text
            assert admin.delete(f"/v1/models/{imp.json()['id']}").status_code == 200
            out_id = _import(stack, outside, "outside")
            _assert_error(admin.delete(f"/v1/models/{out_id}"), 409, param="confirm_outside")
            assert outside.exists()
            assert admin.delete(f"/v1/models/{out_id}", params={"confirm_outside": True}).status_code == 200
            assert not outside.exists()
    finally:
        for p in (models / "linked.safetensors", models / "cycle", inside):
            p.unlink(missing_ok=True)


def test_fine_tunes_are_scoped_per_key(stack: Stack, assets: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(stack.env["HDM_DATA_ROOT"]) / "scoped-set"
    folder.mkdir(parents=True, exist_ok=True)
    with stack.client() as c:
        ds = c.post("/v1/datasets", json={"name": "scoped", "path": "scoped-set"}).json()
        job = c.post(
            "/v1/train-jobs",
            json={
                "arch": "xut-pixel-debug",
                "dataset": ds["id"],
                "precision": "fp32",
                "stages": [{"resolution": 16, "steps": 2, "batch_size": 2}],
            },
        )
        assert job.status_code == 202, job.text
        job = job.json()
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
    dest = Path(stack.env["HDM_MODELS_DIR"]) / "train" / job["id"] / "step-2.safetensors"
    dest.parent.mkdir(parents=True)
    shutil.copy(assets["model"], dest)
    # what the worker's supervisor does with each checkpoint of a run
    ckpt_id = _py(
        stack,
        "from pathlib import Path\nfrom app.db import session_scope\n"
        "from app.services.models import register_file\n"
        f"with session_scope() as s: print(register_file(s, Path({str(dest)!r}), "
        f"name='{job['id']}-step-2', source='train_job', train_job_id='{job['id']}', step=2).id)",
    )
    try:
        with stack.client() as owner:
            assert ckpt_id in [m["id"] for m in owner.get("/v1/models").json()["data"]]
            assert owner.get(f"/v1/models/{ckpt_id}/file").status_code == 200
            assert _image_model(stack, {"model": ckpt_id}) == f"{job['id']}-step-2"
        with stack.client(key=OTHER_KEY) as other:
            listed = [m["id"] for m in other.get("/v1/models").json()["data"]]
            assert ckpt_id not in listed and listed, listed  # shared models stay visible
            _assert_error(other.get(f"/v1/models/{ckpt_id}"), 404)
            _assert_error(other.get(f"/v1/models/{ckpt_id}/file"), 404)
            _assert_error(other.delete(f"/v1/models/{ckpt_id}"), 404)
            _assert_error(
                other.post("/v1/images", json={"prompt": "x", "model": ckpt_id, **SMALL}), 422, param="model"
            )
        with stack.client(key=ADMIN_KEY) as admin:
            assert ckpt_id in [m["id"] for m in admin.get("/v1/models").json()["data"]]
        with stack.client() as owner:  # an own fine-tune inside the models folder: the owner deletes it
            r = owner.delete(f"/v1/models/{ckpt_id}")
            assert r.status_code == 200 and r.json()["file_deleted"] is True, r.text
        assert not dest.exists()
    finally:
        dest.unlink(missing_ok=True)


def test_admin_imports_a_file_of_the_models_folder_over_the_api(
    stack: Stack, assets: dict[str, Path], tmp_path: Path
) -> None:
    models = assets["models"]
    dropped = Path(shutil.copy(assets["model"], models / "dropped.safetensors"))  # after the start-up scan
    outside = Path(shutil.copy(assets["model"], tmp_path / "outside.safetensors"))
    (models / "escape.safetensors").symlink_to(outside)  # resolves outside the folder: refused like outside
    (models / "notes.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # no XUT weights
    imported = None
    try:
        with stack.client() as c:  # a plain key may not add shared models
            _assert_error(c.post("/v1/models/import", json={"path": "dropped.safetensors"}), 403)
        with stack.client(key=ADMIN_KEY) as admin:
            for path, status, code in (
                (str(outside), 403, "path_outside_models_dir"),
                ("../outside.safetensors", 403, "path_outside_models_dir"),
                ("escape.safetensors", 403, "path_outside_models_dir"),
                ("missing.safetensors", 422, "not_a_file"),
                ("notes.safetensors", 422, "not_a_checkpoint"),
            ):
                _assert_error(admin.post("/v1/models/import", json={"path": path}), status, "path", code)
            _assert_error(admin.post("/v1/models/import", json={}), 422, "path")
            assert "dropped" not in _names(stack)
            r = admin.post("/v1/models/import", json={"path": str(dropped), "name": "dropped"})
            assert r.status_code == 200, r.text
            imported = r.json()
            assert imported["name"] == "dropped" and imported["shared"] and not imported["default"]
            assert imported["path"] == str(dropped.resolve())
            again = admin.post("/v1/models/import", json={"path": "dropped.safetensors"})
            assert again.json()["id"] == imported["id"]  # idempotent by path
        assert "dropped" in _names(stack, key=OTHER_KEY)  # shared: every key sees it
        assert _image_model(stack, {"model": "dropped"}) == "dropped"
    finally:
        if imported:
            with stack.client(key=ADMIN_KEY) as admin:
                assert admin.delete(f"/v1/models/{imported['id']}").status_code == 200
        for p in (dropped, models / "escape.safetensors", models / "notes.safetensors"):
            p.unlink(missing_ok=True)
