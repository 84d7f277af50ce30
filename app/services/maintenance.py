"""Periodic upkeep, safe to run in several processes at once (every change is an atomic conditional UPDATE):
requeue or fail jobs whose worker died, re-publish queued jobs the broker lost, force stuck cancels, release stale
GPU leases, schedule train jobs, remove expired outputs and uploads (app/services/storage.py). Webhooks are sent by their own thread (``webhooks.DeliveryThread``)."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app import queue
from app.db import session_scope
from app.models import GpuLease, Job
from app.services import jobs, nodes, storage, training
from app.settings import get_settings

log = logging.getLogger(__name__)


def recover_stale(session: Session) -> int:
    settings = get_settings()
    stale = jobs.stale_before(settings.stale_after_s)
    rows = list(
        session.scalars(
            select(Job).where(
                Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)
            )
        )
    )
    for job in rows:
        if job.cancel_requested_at is not None:
            jobs.finish(session, job.id, "cancelled")
        elif job.attempts >= settings.max_attempts:
            log.warning(
                "job %s: worker lost on attempt %d of %d; failing it",
                job.id,
                job.attempts,
                settings.max_attempts,
            )
            jobs.finish(
                session,
                job.id,
                "failed",
                error={
                    "code": "worker_lost",
                    "message": f"The worker died {job.attempts} times running this job.",
                },
            )
        else:
            log.warning("job %s: worker %s lost (attempt %d); re-queueing", job.id, job.worker, job.attempts)
            jobs.requeue(session, job, "worker_lost", stale=stale)
    session.execute(
        update(GpuLease)
        .where(GpuLease.job_id.is_not(None), GpuLease.heartbeat_at < stale)
        .values(job_id=None, worker=None)
    )
    session.commit()
    return len(rows)


def force_cancels(session: Session) -> int:
    """Cooperative cancel first; a job still running long after the request is ended and its task revoked
    (terminated), unless its process also runs other jobs (a batch): those are never killed for it."""
    settings = get_settings()
    limit = jobs.stale_before(settings.force_cancel_after_s)
    rows = list(session.scalars(select(Job).where(Job.status == "running", Job.cancel_requested_at < limit)))
    for job in rows:
        shared = _shares_process(session, job)
        if shared:
            # its process runs other jobs of its batch: the job ends here, its rows and files are dropped by the
            # worker (worker/images.py), and nothing is terminated
            log.warning(
                "job %s: cancel forced without terminating its worker (it also runs %s)", job.id, shared
            )
        elif not settings.embedded:
            try:
                queue.get_celery().control.revoke(
                    queue.task_id(job.id, job.enqueue_count), terminate=True, signal="SIGTERM"
                )
            except Exception as exc:
                log.warning("revoke %s: %s", job.id, exc)
        jobs.finish(
            session, job.id, "cancelled", error={"code": "cancelled", "message": "forced after timeout"}
        )
        if not shared:  # else the slot stays leased to the batch that runs on it
            session.execute(
                update(GpuLease).where(GpuLease.job_id == job.id).values(job_id=None, worker=None)
            )
        session.commit()
    return len(rows)


def _shares_process(session: Session, job: Job) -> list[str]:
    """The other image jobs of ``job``'s batch: running image jobs of the same image worker (one process per image
    worker, --concurrency 1). A trainer service runs train jobs in processes of their own."""
    if job.worker is None or job.kind != "image":
        return []
    same = [Job.status == "running", Job.kind == "image", Job.worker == job.worker, Job.id != job.id]
    return list(session.scalars(select(Job.id).where(*same)))


_last_scan = 0.0


def republish_lost(session: Session) -> int:
    """Queued jobs with no message in the broker (e.g. after FLUSHALL), or whose only message was delivered to a
    worker that died (held in Redis ``unacked`` until the visibility timeout), are published again.

    The full scan runs when the broker's marker key is gone (its state was lost) or every reconcile_interval_s."""
    global _last_scan
    settings = get_settings()
    if settings.embedded:
        return 0
    now = time.monotonic()
    lost = not queue.marker_present(settings)
    if not lost and now - _last_scan < settings.reconcile_interval_s:
        return 0
    if lost:  # every queued job counts (a duplicate message is harmless: claiming is atomic)
        queue.set_marker(settings)
    cond = [Job.status == "queued", Job.queue.is_not(None)]
    if not lost:
        grace = jobs.stale_before(settings.reenqueue_grace_s)
        cond.append(or_(Job.enqueued_at.is_(None), Job.enqueued_at < grace))
    candidates = list(session.scalars(select(Job).where(*cond)))
    if not candidates:
        _last_scan = now
        return 0
    view = queue.broker_view(settings, stuck_after_s=settings.stale_after_s)
    if view is None:
        return 0
    n = 0
    for job in candidates:
        if job.id in view.waiting:
            continue
        if job.id in view.stuck:
            # delivered long ago and never acknowledged: the worker holding it died (item 1 of issue 10)
            queue.drop_unacked(settings, view.stuck[job.id])
            log.warning(
                "job %s is queued but its message is stuck with a dead worker; publishing it again", job.id
            )
        else:
            log.warning("job %s is queued but not in the broker; publishing it again", job.id)
        jobs.enqueue(session, job)
        if job.kind == "train" and job.slots and nodes.is_multinode(job):
            nodes.publish_members(job)  # the further nodes' messages went with it (a spare one finds no slot)
        n += 1
    _last_scan = now
    return n


STEPS = (recover_stale, force_cancels, republish_lost, training.schedule, storage.expire)


def tick() -> None:
    for step in STEPS:
        try:
            with session_scope() as session:
                step(session)
        except Exception:
            log.exception("maintenance step %s failed", step.__name__)


class MaintenanceThread(threading.Thread):
    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__(name="hdm-maintenance", daemon=True)
        self.interval_s = interval_s or get_settings().maintenance_interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        log.info("maintenance every %.1fs", self.interval_s)
        while not self.stop_event.is_set():
            tick()
            self.stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self.stop_event.set()
