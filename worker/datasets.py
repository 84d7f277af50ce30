"""Dataset validation job: scan the folder, record counts and problems on the dataset row."""

from __future__ import annotations

import logging
from pathlib import Path

from app.db import session_scope, utcnow
from app.models import Dataset
from app.services import jobs
from hdm_core.data.scan import dataset_stats
from worker.claim import claim

log = logging.getLogger(__name__)


def run_dataset_job(job_id: str, *, worker: str) -> str:
    c = claim(job_id, worker)
    if isinstance(c, str):
        return c
    attempt, ds_id = c.attempt, c.dataset_id
    folder = Path(c.dataset_path) if c.dataset_path else None
    stats, error = None, None
    try:
        if folder is None:
            raise ValueError("dataset row is gone")
        stats = dataset_stats(folder)  # the trainer's own scan: validated N images = N trained on
        if stats["images"] == 0:
            error = {"code": "empty_dataset", "message": f"no images found in {folder}"}
    except Exception as exc:
        error = {"code": "validation_error", "message": f"{type(exc).__name__}: {exc}"}
    with session_scope() as session:
        ds = session.get(Dataset, ds_id)
        if ds is not None:
            ds.stats, ds.error, ds.updated_at = stats, error, utcnow()
            ds.status = "invalid" if error else "ready"
        session.commit()
        outcome = "failed" if error else "succeeded"
        jobs.finish(session, job_id, outcome, error=error, result={"stats": stats}, attempt=attempt)
    return outcome
