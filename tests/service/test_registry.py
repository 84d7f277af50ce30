"""The registry rules in process on a migrated SQLite database and real files (app/services/registry.py): the scan
gives a file a job wrote into the models folder to that job's key, tombstones keep deleted files out of the scan
until an import revives them, and plain keys see paths relative to the service's folders."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_adapters import _adapter, _base_model

import hdm_core
from hdm_core.adapters.network import AdapterConfig
from hdm_core.codec import PixelCodec


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from app.db import reset_caches
    from app.migrate import upgrade
    from app.settings import get_settings

    url = f"sqlite:///{tmp_path / 'hdm.db'}"
    for name, value in {
        "HDM_DATABASE_URL": url,
        "HDM_MODELS_DIR": str(tmp_path / "models"),
        "HDM_OUTPUTS_DIR": str(tmp_path / "outputs"),
        "HDM_RUNS_DIR": str(tmp_path / "runs"),
        "HDM_DATA_ROOT": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    reset_caches()
    upgrade(url)
    yield tmp_path / "models"
    get_settings.cache_clear()
    reset_caches()


def _job(session, job_id: str, kind: str, owner: str) -> None:  # type: ignore[no-untyped-def]
    from app.models import Job

    session.add(Job(id=job_id, kind=kind, status="succeeded", owner=owner, request_sha256="x", request={}))
    session.commit()


def test_the_scan_gives_a_jobs_files_to_its_key(db: Path) -> None:
    from app.db import session_scope
    from app.models import Adapter, Checkpoint
    from app.services import adapters, models

    base = db / "base.safetensors"
    db.mkdir()
    hdm_core.save_checkpoint(base, _base_model(), codec=PixelCodec())
    (db / "train" / "train_a").mkdir(parents=True)
    (db / "merged").mkdir()
    shutil.copy(base, db / "train" / "train_a" / "step-00000002.safetensors")
    shutil.copy(base, db / "merged" / "merge_b.safetensors")
    _adapter(base, _base_model(), AdapterConfig(), db / "train" / "train_c" / "final.safetensors", seed=2)
    with session_scope() as session:
        _job(session, "train_a", "train", "key_a")
        _job(session, "merge_b", "merge", "key_b")
        _job(session, "train_c", "train", "key_c")
        assert models.scan_models_dir(session) == 3
        assert adapters.scan_models_dir(session) == 1
        owners = {Path(c.path).name: (c.owner, c.train_job_id) for c in session.query(Checkpoint)}
        assert owners == {
            "base.safetensors": (None, None),
            "step-00000002.safetensors": ("key_a", "train_a"),
            "merge_b.safetensors": ("key_b", None),
        }
        (row,) = session.query(Adapter)
        assert (row.name, row.owner, row.train_job_id) == ("train_c-final", "key_c", "train_c")


def test_tombstones_keep_deleted_files_out_until_revived(db: Path) -> None:
    from app.auth import Caller
    from app.db import session_scope
    from app.models import Adapter
    from app.services import adapters, registry

    base = db / "base.safetensors"
    db.mkdir()
    hdm_core.save_checkpoint(base, _base_model(), codec=PixelCodec())
    path = _adapter(base, _base_model(), AdapterConfig(), db / "style.safetensors", seed=1)
    kept = path.read_bytes()
    with session_scope() as session:
        assert adapters.scan_models_dir(session) == 1
        row = session.query(Adapter).one()
        assert registry.shown_path(row.path, admin=False) == "models/style.safetensors"
        assert registry.shown_path(row.path, admin=True) == str(path.resolve())
        assert registry.shown_path("/elsewhere/x.safetensors", admin=False) == "x.safetensors"
        with pytest.raises(Exception, match="admin keys") as refused:
            adapters.delete(session, row, Caller("key_a", admin=False))
        assert getattr(refused.value, "status", None) == 403 and path.is_file()
        assert adapters.delete(session, row, Caller("key_admin", admin=True)) is True
        assert not path.exists()
        path.write_bytes(kept)  # the same file again
        assert adapters.scan_models_dir(session) == 0 and session.query(Adapter).count() == 0
        with pytest.raises(registry.Deleted):
            adapters.register_file(session, path)
        revived = adapters.register_file(session, path, revive=True)
        session.commit()
        assert revived.name == "style" and not registry.is_deleted(session, "adapter", path)
