"""Celery app for GPU workers: ``celery -A worker.celery_app worker --concurrency 1 -Q hdm.gpu.N,hdm.images``.

The main process never imports torch (tasks import it lazily in the pool child), so CUDA is not initialised
before the fork."""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutting_down

from app.queue import make_celery
from app.settings import get_settings

log = logging.getLogger(__name__)
app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]


@worker_ready.connect
def _recover_on_start(**_kw: object) -> None:
    from app.services.maintenance import tick

    log.info("worker ready: running recovery once")
    tick()


@worker_shutting_down.connect
def _preempt_training(sender: object = None, **_kw: object) -> None:
    """Warm shutdown (SIGTERM): a training run under this worker stops and goes back to the queue; it resumes
    from its newest checkpoint on the next free slot."""
    from worker.training import request_preempt

    request_preempt(str(sender))
