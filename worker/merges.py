"""Run one merge job by id: the job's model with its adapters merged in, written under the models folder and
registered as a new model (hdm_core/adapters/merge.py does the work)."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.db import session_scope
from app.models import Job
from app.services import jobs, models
from app.settings import get_settings
from worker.claim import claim

log = logging.getLogger(__name__)


def run_merge_job(job_id: str, *, worker: str) -> str:
    from hdm_core.adapters.merge import merge_checkpoint

    c = claim(job_id, worker)
    if isinstance(c, str):
        return c
    outcome, error, result = "failed", None, None
    try:
        gone = [a.name for a in c.adapters if a.path is None]
        if c.model is None or gone:
            raise ValueError(f"the job's model or adapter(s) {gone} are no longer registered")
        out = get_settings().models_dir / "merged" / f"{job_id}.safetensors"
        merge_checkpoint(c.model.path, [(str(a.path), a.weight) for a in c.adapters], out)
        name = c.request.get("name") or "+".join([c.model.name, *(a.name for a in c.adapters)])
        with session_scope() as session:
            owner = session.scalar(
                select(Job.owner).where(Job.id == job_id)
            )  # the merge belongs to its caller
            ckpt = models.register_file(session, out, name=name, source="merge", owner=owner)
            result = {"model": ckpt.id}
        outcome = "succeeded"
    except ValueError as exc:  # AdapterError, CheckpointError: the request cannot be done
        log.warning("merge job %s: %s", job_id, exc)
        error = {"code": "invalid_request", "message": str(exc)}
    except Exception as exc:
        log.exception("merge job %s failed", job_id)
        error = {"code": "merge_error", "message": f"{type(exc).__name__}: {exc}"}
    with session_scope() as session:
        jobs.finish(session, job_id, outcome, error=error, result=result, attempt=c.attempt)
    return outcome
