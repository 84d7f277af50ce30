"""The prologue every task shares: take a queued job for this delivery (queued -> running, once), hold its GPU
slots, and read what the run needs while the row is at hand. Tasks take ids and are idempotent: a redelivered
message for a job that is not queued any more does nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import update

from app.db import session_scope
from app.models import Adapter, Checkpoint, Dataset, Job
from app.services import jobs, leases, nodes

log = logging.getLogger(__name__)
BOUNCE_S = 2.0


@dataclass(frozen=True)
class ModelFile:
    """The registered model a job runs on (the row itself stays in its session)."""

    path: str
    name: str
    sha256: str | None
    codec: str | None
    arch: dict[str, Any] | None


@dataclass(frozen=True)
class AdapterFile:
    """An adapter a job applies (request order); ``path`` is None when it was unregistered after the request."""

    id: str
    name: str
    path: str | None
    sha256: str
    weight: float


@dataclass(frozen=True)
class Claimed:
    job_id: str
    attempt: int  # only this attempt may finish the job (jobs.finish(attempt=...))
    request: dict[str, Any]
    slots: list[int]
    model: ModelFile | None
    dataset_id: str | None
    dataset_path: str | None
    adapters: tuple[AdapterFile, ...] = ()


def claim(job_id: str, worker: str, *, slot: int | None = None) -> Claimed | Literal["skipped", "bounced"]:
    """``slot``: the GPU this worker owns; when another job holds its lease the job goes back to the queue
    ("bounced"). A train job's own slots (reserved by the scheduler) are acquired before the claim."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            log.info("job %s is %s; nothing to do", job_id, job.status if job else "missing")
            return "skipped"
        if slot is not None and not leases.acquire(session, slot, job_id, worker):
            log.info("slot %s is leased to another job; job %s goes back to the queue", slot, job_id)
            jobs.enqueue(session, job, countdown=BOUNCE_S)
            return "bounced"
        slots = nodes.parts(job)[0]  # node 0's part: further nodes take theirs (worker/nodes.py)
        # A train job's reserved slots, taken before the claim: if one went stale and another job holds it now, the
        # job must not start (two trainers on one GPU); it goes back to the scheduler for new slots.
        if slots and not all(leases.acquire(session, s, job_id, worker) for s in slots):
            log.warning("job %s: a reserved slot of %s is held by another job; rescheduling", job_id, slots)
            leases.release(session, job_id)
            session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued").values(slots=None, queue=None)
            )
            jobs.add_event(session, job_id, "log", {"message": f"slots {slots} were taken; rescheduling"})
            session.commit()
            return "bounced"
        if not jobs.claim(session, job_id, worker):
            if slot is not None:  # only the lease taken just now: a running delivery keeps its own
                leases.release(session, job_id)
            return "skipped"
        session.refresh(job)
        ckpt = session.get(Checkpoint, job.model_id) if job.model_id else None
        ds = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        applied = []
        for a in job.request.get("adapters") or []:
            row = session.get(Adapter, a["id"])
            applied.append(
                AdapterFile(a["id"], a["name"], row.path if row else None, a["sha256"], float(a["weight"]))
            )
        return Claimed(
            job_id=job_id,
            attempt=job.attempts,
            request=dict(job.request),
            slots=slots,
            model=ModelFile(ckpt.path, ckpt.name, ckpt.sha256, ckpt.codec, ckpt.arch) if ckpt else None,
            dataset_id=job.dataset_id,
            dataset_path=ds.path if ds else None,
            adapters=tuple(applied),
        )
