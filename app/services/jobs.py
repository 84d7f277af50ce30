"""Job lifecycle shared by the API, the workers and maintenance: create (idempotent, queue-limited), events,
atomic status transitions, cancel, listing with cursors. No torch here."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import false, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import queue
from app.db import keyset_page, utcnow
from app.errors import Conflict, NotFound, TooMany
from app.ids import new_id
from app.models import Job, JobEvent, WebhookDelivery
from app.settings import get_settings

log = logging.getLogger(__name__)
FINAL = queue.FINAL
PREFIX = {"image": "img", "train": "train", "dataset": "dsv", "merge": "merge"}


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def add_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, type=type_, data=data, created_at=utcnow()))


def find_idempotent(session: Session, owner: str, key: str | None, digest: str) -> Job | None:
    key = (key or "").strip() or None
    if not key:
        return None
    job = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    if job is not None and job.request_sha256 != digest:
        raise Conflict(
            "Idempotency-Key was already used with a different request body.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return job


def lock_owner_queue(session: Session, owner: str) -> None:
    """Serialise count-then-insert per key until the transaction ends: PostgreSQL takes a transaction-level
    advisory lock on the key; SQLite takes its one write lock with a no-op UPDATE (pysqlite begins the transaction
    at the first write, so the count that follows sees every committed insert)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"hdm.queue:{owner}"})
    else:
        session.execute(update(Job).where(false()).values(owner=Job.owner))


def check_queue_limit(session: Session, owner: str) -> None:
    """Call with the owner's queue locked (``lock_owner_queue``) in the transaction that inserts the job."""
    settings = get_settings()
    n = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.owner == owner, Job.status == "queued")
        )
        or 0
    )
    if n >= settings.queue_limit:
        session.rollback()  # ends the transaction: the lock goes with it
        raise TooMany(
            f"Too many queued jobs for this key ({n} >= {settings.queue_limit}); retry later.",
            headers={"Retry-After": str(settings.retry_after_s)},
        )


def create_job(
    session: Session,
    *,
    kind: str,
    owner: str,
    idempotency_key: str | None,
    raw_body: dict[str, Any],
    request: dict[str, Any],
    queue_name: str | None,
    model_id: str | None = None,
    dataset_id: str | None = None,
    webhook: str | None = None,
    status: str = "queued",
    publish: bool = True,
    on_accept: Callable[[], object] | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). Same key + same body returns the first job; different body raises 409.
    ``on_accept``: writes what the job needs (its uploads) after every check passed, before the commit makes the
    job visible to workers."""
    idempotency_key = (idempotency_key or "").strip() or None
    digest = request_hash(raw_body)
    existing = find_idempotent(session, owner, idempotency_key, digest)
    if existing is not None:
        return existing, False
    lock_owner_queue(session, owner)
    check_queue_limit(session, owner)
    job = Job(
        id=new_id(PREFIX[kind]),
        kind=kind,
        status=status,
        owner=owner,
        idempotency_key=idempotency_key,
        request_sha256=digest,
        request=request,
        model_id=model_id,
        dataset_id=dataset_id,
        webhook=webhook,
        queue=queue_name,
        created_at=utcnow(),
        progress_total=int(request.get("steps", 0) or 0),
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = find_idempotent(session, owner, idempotency_key, digest)
        if existing is None:
            raise
        return existing, False
    add_event(session, job.id, "status", {"status": status})
    if on_accept is not None:
        on_accept()
    send = publish and status == "queued"
    if send:  # one commit for row, event and enqueue bookkeeping; then the broker
        job.enqueue_count, job.enqueued_at = 1, utcnow()
    session.commit()
    if send:
        _publish(job, 1)
    return job, True


def enqueue(session: Session, job: Job, countdown: float | None = None) -> None:
    """DB first, then the broker: if publishing fails the job stays queued and maintenance re-publishes it."""
    job.enqueue_count += 1
    job.enqueued_at = utcnow()
    count = job.enqueue_count
    session.commit()
    _publish(job, count, countdown)


def _publish(job: Job, count: int, countdown: float | None = None) -> None:
    try:
        queue.publish(job.kind, job.id, job.queue or get_settings().image_queue, count, countdown)
    except Exception as exc:
        log.warning("publish of %s failed (maintenance will retry): %s", job.id, exc)


def get_job(session: Session, job_id: str, kind: str, owner: str | None = None) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.kind != kind or (owner is not None and job.owner != owner):
        raise NotFound(f"No {kind} job with id {job_id!r}.", param="id")
    return job


def list_jobs(
    session: Session, kind: str, owner: str, limit: int, after: str | None, status: str | None = None
) -> tuple[list[Job], bool]:
    q = select(Job).where(Job.kind == kind, Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    return keyset_page(session, q, Job.id, limit, after)


def claim(session: Session, job_id: str, worker: str) -> bool:
    """queued -> running, atomically; False if another delivery already took it (or it is final)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            started_at=now,
            heartbeat_at=now,
            worker=worker,
            attempts=Job.attempts + 1,
            progress_step=0,
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    add_event(session, job_id, "status", {"status": "running", "worker": worker})
    session.commit()
    return True


def heartbeat(session: Session, job_id: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(heartbeat_at=utcnow())
    )
    session.commit()


def finish(
    session: Session,
    job_id: str,
    status: str,
    *,
    error: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    from_status: tuple[str, ...] = ("running",),
    attempt: int | None = None,
) -> bool:
    """Move to a final status once (later calls do nothing); records events and the webhook delivery."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if result is not None:
        values["result"] = result
    cond = [Job.id == job_id, Job.status.in_(from_status)]
    if attempt is not None:  # only the delivery that owns this attempt may finish it
        cond.append(Job.attempts == attempt)
    res = session.execute(update(Job).where(*cond).values(**values))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    add_event(session, job_id, "status", {"status": status, **({"error": error} if error else {})})
    add_event(session, job_id, "done", {"status": status})
    if job.webhook:
        session.add(WebhookDelivery(job_id=job_id, url=job.webhook, next_attempt_at=utcnow()))
    session.commit()
    return True


def requeue(session: Session, job: Job, reason: str, stale: datetime | None = None) -> None:
    """running -> queued for a retry (worker lost, worker shutting down), then published again. A train job
    gives its slots back and waits for the scheduler to place it again."""
    cond = [Job.id == job.id, Job.status == "running"]
    if stale is not None:
        cond.append(Job.heartbeat_at < stale)
    values: dict[str, Any] = {"status": "queued", "worker": None, "heartbeat_at": None, "started_at": None}
    if job.kind == "train":
        values.update(slots=None, queue=None)
    else:
        values["progress_step"] = 0
    res = session.execute(update(Job).where(*cond).values(**values))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return
    add_event(session, job.id, "status", {"status": "queued", "reason": reason, "attempts": job.attempts})
    session.commit()
    session.refresh(job)
    if job.kind != "train":
        enqueue(session, job)


def cancel(session: Session, job: Job) -> Job:
    if job.status in ("succeeded", "failed"):
        raise Conflict(f"Job {job.id} already {job.status}; nothing to cancel.", code="job_finished")
    if job.status == "cancelled":
        return job
    now = utcnow()
    session.execute(
        update(Job).where(Job.id == job.id, Job.cancel_requested_at.is_(None)).values(cancel_requested_at=now)
    )
    session.commit()
    if not finish(session, job.id, "cancelled", from_status=("queued", "validating")):
        add_event(session, job.id, "log", {"message": "cancel requested"})
        session.commit()
    session.refresh(job)
    return job


def cancel_requested(session: Session, job_id: str) -> bool:
    row = session.execute(select(Job.cancel_requested_at, Job.status).where(Job.id == job_id)).first()
    return row is None or row[0] is not None or row[1] != "running"


def status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def events_after(session: Session, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit)
        )
    )


def stale_before(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)
