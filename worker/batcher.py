"""Batching across requests: the image worker that claims a job also claims queued image jobs that can share its
network batch (hdm_core.batching), up to HDM_MAX_BATCH. Each companion is claimed with the same atomic
queued -> running claim as a delivered job (worker/claim.py), so no job runs twice; the Celery message of a
companion arrives later and finds the job no longer queued (a no-op). Each job keeps its own progress events,
cancel, outputs and final status."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import or_, select, update

from app.db import session_scope, utcnow
from app.models import Job
from app.services import jobs
from app.settings import get_settings
from worker.claim import Claimed, claim

log = logging.getLogger(__name__)
# What every job of one batch shares (generate_batch's keyword arguments, and the adapters merged into the model).
# Prompt, negative prompt, seed, n and output format may differ; an edit job (init image) always samples alone.
SHARED_FIELDS = (
    "width",
    "height",
    "steps",
    "sampler",
    "guidance_scale",
    "shift",
    "schedule",
    "camera",
    "tread_guidance",
    "adapters",
)
EDIT_FIELDS = ("init_image", "mask")
CANDIDATES_PER_SLOT = 8  # queued rows read per free place in the batch (others may not match)


def batch_key(req: dict[str, Any]) -> str | None:
    """Jobs with equal keys (and the same model) can share a batch; None: this job samples alone."""
    if any(req.get(k) for k in EDIT_FIELDS):
        return None
    return json.dumps({k: req.get(k) for k in SHARED_FIELDS}, sort_keys=True)


def claim_companions(primary: Claimed, worker: str, limit: int) -> list[Claimed]:
    """Claim up to ``limit - 1`` queued image jobs (oldest first) that can share ``primary``'s batch. The primary's
    slot lease covers them: they run on its GPU, in its process, and finish with it."""
    key = batch_key(primary.request)
    if limit <= 1 or key is None:
        return []
    image_queue = get_settings().image_queue
    with session_scope() as session:
        model_id = session.scalar(select(Job.model_id).where(Job.id == primary.job_id))
        rows = session.execute(
            select(Job.id, Job.request)
            .where(
                Job.kind == "image",
                Job.status == "queued",
                Job.model_id == model_id,
                Job.cancel_requested_at.is_(None),
                or_(Job.queue.is_(None), Job.queue == image_queue),
                Job.id != primary.job_id,
            )
            .order_by(Job.created_at, Job.id)
            .limit(CANDIDATES_PER_SLOT * limit)
        ).all()
    out: list[Claimed] = []
    for job_id, req in rows:
        if len(out) >= limit - 1:
            break
        if batch_key(req) != key:
            continue
        c = claim(job_id, worker)  # None when another worker took it first
        if isinstance(c, Claimed):
            out.append(c)
    return out


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(6)


class BatchProgress:
    """generate_batch's callback for the jobs of one batch: each job's own progress events, and the indices of jobs
    whose cancel was requested (they leave the batch at once and are finished as cancelled right here)."""

    def __init__(self, group: Sequence[Claimed], result: dict[str, Any]) -> None:
        self.group, self.result = group, result
        self.cancelled: set[int] = set()
        self.last_write = 0.0

    def __call__(self, step: int, total: int, active: Sequence[int]) -> Collection[int]:
        now = time.monotonic()
        write = step >= total or now - self.last_write >= 0.2
        with session_scope() as session:
            for j in active:
                c = self.group[j]
                if jobs.cancel_requested(session, c.job_id):
                    self.cancelled.add(j)
                    jobs.finish(session, c.job_id, "cancelled", result=self.result, attempt=c.attempt)
                    log.info("job %s cancelled at step %d of its batch", c.job_id, step)
                elif write:
                    session.execute(
                        update(Job)
                        .where(Job.id == c.job_id)
                        .values(progress_step=step, progress_total=total, heartbeat_at=utcnow())
                    )
                    jobs.add_event(session, c.job_id, "progress", {"step": step, "total": total})
            session.commit()
        if write:
            self.last_write = now
        return self.cancelled & set(active)
