"""Celery app for GPU workers: ``celery -A worker.celery_app worker --concurrency 1 -Q hdm.gpu.N,hdm.images``.

The main process never imports torch (tasks import it lazily in the pool child), so CUDA is not initialised
before the fork."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    task_postrun,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from app.queue import make_celery
from app.settings import get_settings
from worker import metrics

log = logging.getLogger(__name__)
metrics.prepare_multiprocess_dir()  # before any pool process exists (worker/metrics.py)
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


@worker_init.connect
def _serve_metrics(**_kw: object) -> None:
    port = get_settings().worker_metrics_port
    if port is not None:
        metrics.serve(port)


@worker_process_shutdown.connect
def _pool_process_gone(pid: int | None = None, **_kw: object) -> None:
    if pid is not None:
        metrics.process_gone(pid)


@task_postrun.connect
def _job_metrics(task: Any = None, args: Any = None, **_kw: object) -> None:
    """Run time and queue wait of the task's job; image batches record theirs in worker/images.py."""
    if task is None or not args or task.name == "hdm.image":
        return
    try:
        metrics.metrics().jobs_ended([str(args[0])])
    except Exception:  # a metric must never fail or requeue a job
        log.exception("job metrics for %s", args[0])
