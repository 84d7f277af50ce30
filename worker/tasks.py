"""Celery tasks. They take ids only and are idempotent; the database says what is left to do."""

from __future__ import annotations

import logging

from app.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


def _slot() -> int | None:
    return get_settings().gpu_index


@app.task(name="hdm.image", bind=True, acks_late=True, ignore_result=True)
def image_task(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from worker.images import run_image_job

    return run_image_job(job_id, worker=str(self.request.hostname), slot=_slot())


@app.task(name="hdm.train", bind=True, acks_late=True, ignore_result=True)
def train_task(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from worker.training import run_train_job

    return run_train_job(job_id, worker=str(self.request.hostname))


@app.task(name="hdm.train_node", bind=True, acks_late=True, ignore_result=True)
def train_node_task(self, job_id: str, rank: int) -> str:  # type: ignore[no-untyped-def]
    from worker.nodes import run_node_part

    return run_node_part(job_id, rank, worker=str(self.request.hostname))


@app.task(name="hdm.dataset", bind=True, acks_late=True, ignore_result=True)
def dataset_task(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from worker.datasets import run_dataset_job

    return run_dataset_job(job_id, worker=str(self.request.hostname))


@app.task(name="hdm.merge", bind=True, acks_late=True, ignore_result=True)
def merge_task(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from worker.merges import run_merge_job

    return run_merge_job(job_id, worker=str(self.request.hostname))
