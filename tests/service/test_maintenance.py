"""Recovery rules on a real (SQLite) database, in process: retry a lost job up to max_attempts, then fail it;
leave live jobs alone; only the attempt that owns a job may finish it; stale leases free their slot."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app import db
from app.migrate import upgrade


@pytest.fixture
def sqlite_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("HDM_DATABASE_URL", url)
    monkeypatch.setenv("HDM_BROKER_URL", "db://")
    monkeypatch.setenv("HDM_STALE_AFTER_S", "10")
    monkeypatch.setenv("HDM_MAX_ATTEMPTS", "3")
    db.reset_caches()
    upgrade(url)
    yield
    db.reset_caches()


def _job(session, job_id: str, attempts: int, heartbeat_age_s: float, status: str = "running"):  # type: ignore[no-untyped-def]
    from app.models import Job

    now = db.utcnow()
    job = Job(
        id=job_id,
        kind="image",
        status=status,
        owner="o",
        request_sha256="x",
        request={"steps": 2},
        queue="hdm.images",
        attempts=attempts,
        started_at=now,
        heartbeat_at=now - timedelta(seconds=heartbeat_age_s),
    )
    session.add(job)
    session.commit()
    return job


def test_lost_jobs_are_retried_then_failed(sqlite_db: None) -> None:
    from app.models import Job
    from app.services import jobs, maintenance

    with db.session_scope() as s:
        _job(s, "img_retry", attempts=1, heartbeat_age_s=60)
        _job(s, "img_give_up", attempts=3, heartbeat_age_s=60)
        _job(s, "img_alive", attempts=1, heartbeat_age_s=1)
        assert maintenance.recover_stale(s) == 2
    with db.session_scope() as s:
        retry, give_up, alive = (s.get(Job, i) for i in ("img_retry", "img_give_up", "img_alive"))
        assert retry.status == "queued" and retry.worker is None and retry.enqueue_count == 1
        assert give_up.status == "failed" and give_up.error["code"] == "worker_lost"
        assert alive.status == "running"
        # the retried job is claimed again: attempt 2 owns it, a late finish from attempt 1 is refused
        assert jobs.claim(s, "img_retry", "w2")
        assert not jobs.finish(s, "img_retry", "succeeded", attempt=1)
        assert jobs.finish(s, "img_retry", "succeeded", attempt=2)
        assert not jobs.finish(s, "img_retry", "failed", attempt=2)  # final is final
        kinds = [e.type for e in jobs.events_after(s, "img_give_up", 0)]
        assert kinds[-2:] == ["status", "done"]


def test_stale_lease_frees_the_slot(sqlite_db: None) -> None:
    from app.models import GpuLease
    from app.services import leases

    with db.session_scope() as s:
        assert leases.acquire(s, 0, "img_a", "w1")
        assert not leases.acquire(s, 0, "img_b", "w2")  # held
        s.get(GpuLease, 0).heartbeat_at = db.utcnow() - timedelta(seconds=60)
        s.commit()
        assert leases.free_slots(s, [0]) == [0]
        assert leases.acquire(s, 0, "img_b", "w2")  # stale: taken over
        leases.release(s, "img_b")
        assert s.get(GpuLease, 0).job_id is None
