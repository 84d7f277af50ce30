"""Batching across requests, as Triton's dynamic batcher: the worker that claims a job also claims, in arrival order
and with no waiting, queued image jobs that run in the SAME network forward as its own (hdm_core.batching), up to
HDM_MAX_BATCH jobs, HDM_BATCH_TOKENS tokens per forward and its fair share while other slots are free (queued jobs /
free workers, from the slot leases); the rest stays queued for the other workers. Each companion is validated
before it joins and claimed with the same atomic queued -> running claim as a delivered job (worker/claim.py), so
no job runs twice; the Celery message of a companion arrives later and finds the job no longer queued (a no-op).
Each job keeps its own progress events, cancel, outputs and final status."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update

from app.db import session_scope, utcnow
from app.models import GpuLease, Job
from app.services import jobs, leases
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
CANDIDATES_PER_SLOT = 8  # queued rows read per place in the batch (others may not match)


@dataclass(frozen=True)
class Forward:
    """What the loaded pipeline says about a network forward: a prompt's context length in tokens
    (HDMPipeline.context_length: the text encoder's own tokenizer, or the model's recorded caption length) and the
    pixels per image token side (HDMPipeline.size_multiple)."""

    context_length: Callable[[str], int]
    size_multiple: int

    @classmethod
    def of(cls, pipe: Any) -> Forward:
        return cls(pipe.context_length, pipe.size_multiple)

    def text_tokens(self, req: dict[str, Any]) -> tuple[int, ...]:
        """Context lengths of the conditional and (with CFG) the unconditional branch."""
        cond = self.context_length(req["prompt"])
        if req["guidance_scale"] == 1.0:
            return (cond,)
        return cond, self.context_length(req.get("negative_prompt") or "")

    def tokens(self, req: dict[str, Any]) -> int:
        """Tokens the network reads per step for this job: each image's patches and text tokens, per branch."""
        m = self.size_multiple
        patches = (req["width"] // m) * (req["height"] // m)
        return int(req["n"]) * sum(patches + t for t in self.text_tokens(req))


def batch_key(req: dict[str, Any], forward: Forward) -> str | None:
    """Jobs with equal keys (and the same model) run in one network forward; None: this job samples alone. The text
    lengths belong in the key: XUT attends to every context token, so padding a prompt changes its image (spec §4),
    and jobs of different lengths could only run as consecutive sub-batches."""
    if any(req.get(k) for k in EDIT_FIELDS):
        return None
    shared = {k: req.get(k) for k in SHARED_FIELDS}
    return json.dumps({**shared, "text_tokens": forward.text_tokens(req)}, sort_keys=True)


def invalid(req: dict[str, Any]) -> str | None:
    """Why this job cannot sample (the pipeline's own ImageJob checks: seed rule, n, prompt), or None. A job is
    checked before it joins a batch, so it fails alone."""
    from hdm_core.batching import ImageJob

    try:
        ImageJob(
            req["prompt"], seed=int(req["seed"]), negative_prompt=req.get("negative_prompt", ""), n=req["n"]
        )
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
    return None


def fair_share(queued: int, own_slot: int | None) -> int:
    """Jobs this worker may take of ``queued`` (its own included) while other slots are free: a slot is free when
    no job holds its lease or its holder stopped beating (app/services/leases.py)."""
    others = [s for s in get_settings().slot_list if s != own_slot]
    with session_scope() as session:
        free = len(leases.free_slots(session, others)) if others else 0
    return math.ceil(queued / (1 + free))


def claim_companions(primary: Claimed, worker: str, forward: Forward, slot: int | None) -> list[Claimed]:
    """Claim queued image jobs (oldest first) that run in ``primary``'s network forward. The primary's slot lease
    covers them: they run on its GPU, in its process, and finish with it."""
    settings = get_settings()
    limit = settings.image_batch_limit
    key = batch_key(primary.request, forward)
    if limit <= 1 or key is None:
        return []
    with session_scope() as session:
        model_id = session.scalar(select(Job.model_id).where(Job.id == primary.job_id))
        held = select(GpuLease.job_id).where(
            GpuLease.job_id.is_not(None)
        )  # delivered to a worker now claiming
        rows = session.execute(
            select(Job.id, Job.request)
            .where(
                Job.kind == "image",
                Job.status == "queued",
                Job.model_id == model_id,
                Job.cancel_requested_at.is_(None),
                or_(Job.queue.is_(None), Job.queue == settings.image_queue),
                Job.id != primary.job_id,
                Job.id.not_in(held),
            )
            .order_by(Job.created_at, Job.id)
            .limit(CANDIDATES_PER_SLOT * limit)
        ).all()
    fitting = [(i, r) for i, r in rows if invalid(r) is None and batch_key(r, forward) == key]
    places = min(limit, fair_share(1 + len(fitting), slot)) - 1
    budget = settings.batch_tokens or math.inf
    used = forward.tokens(primary.request)
    out: list[Claimed] = []
    for job_id, req in fitting:
        if len(out) >= places or used + forward.tokens(req) > budget:
            break  # arrival order: a later job does not jump past one that does not fit
        c = claim(job_id, worker)  # None when another worker took it first
        if isinstance(c, Claimed):
            out.append(c)
            used += forward.tokens(req)
    if fitting:
        log.info(
            "%s: %d of %d queued jobs of its forward join it (share %d, %d tokens)",
            primary.job_id,
            len(out),
            len(fitting),
            places + 1,
            used,
        )
    return out


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(6)


class BatchProgress:
    """generate_batch's callback for the jobs of one batch: each job's own progress events, and the indices of jobs
    whose cancel was requested (their rows leave the batch at once and they are finished as cancelled right here).
    Every job of the batch is checked at every step, also one whose rows already finished or not yet started."""

    def __init__(self, group: Sequence[Claimed], result: dict[str, Any]) -> None:
        self.group, self.result = group, result
        self.cancelled: set[int] = set()
        self.last_write = 0.0

    def __call__(self, step: int, total: int, active: Sequence[int]) -> Collection[int]:
        now = time.monotonic()
        write = step >= total or now - self.last_write >= 0.2
        with session_scope() as session:
            for j, c in enumerate(self.group):
                if j in self.cancelled:
                    continue
                if jobs.cancel_requested(session, c.job_id):
                    self.cancelled.add(j)
                    jobs.finish(session, c.job_id, "cancelled", result=self.result, attempt=c.attempt)
                    log.info("job %s cancelled at step %d of its batch", c.job_id, step)
                elif write and j in active:
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
