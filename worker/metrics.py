"""Worker metrics (prometheus-client) and the worker's scrape endpoint.

Celery runs tasks in forked pool processes, so the numbers are kept in prometheus-client's multiprocess mode
(files under PROMETHEUS_MULTIPROC_DIR, one folder per worker, made at start-up) and the main process serves them
on HDM_WORKER_METRICS_PORT (unset: no endpoint). In docker-compose.yml that port is only exposed inside the
compose network; docs/prometheus.yml scrapes it. Job run time and queue wait are read from the job's row when a
task ends (the database, not the broker, is the truth); torch is imported only where the pool already has it."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Image jobs take seconds to minutes, train jobs minutes to days; one bucket set serves both kinds.
JOB_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    4 * 3600,
    12 * 3600,
    48 * 3600,
)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FINAL = ("succeeded", "failed", "cancelled")


def prepare_multiprocess_dir() -> str:
    """Point prometheus-client at a fresh folder before it is imported (it picks its value store at import)."""
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        log.warning(
            "prometheus_client imported before the multiprocess folder was set: pool metrics are lost"
        )
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="hdm-metrics-")
        atexit.register(
            shutil.rmtree, path, True
        )  # the main process's exit; pool processes leave by os._exit
        os.environ[MULTIPROC_ENV] = path
    return path


class WorkerMetrics:
    def __init__(self, registry: Any = None) -> None:
        """``registry``: prometheus-client's default one (what the multiprocess files hold) unless given."""
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY

        self.queue_wait = Histogram(
            "hdm_job_queue_wait_seconds",
            "From a job's creation to its (latest) start, by kind.",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        )
        self.run_time = Histogram(
            "hdm_job_run_seconds",
            "From a job's start to its end, by kind.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=reg,
        )
        self.finished = Counter(
            "hdm_jobs_finished",
            "Jobs this worker finished, by kind and status.",
            ["kind", "status"],
            registry=reg,
        )
        self.images = Counter("hdm_worker_images", "Images sampled.", registry=reg)
        self.sample_seconds = Counter(
            "hdm_worker_sample_seconds", "Seconds spent sampling images.", registry=reg
        )
        self.images_per_second = Gauge(
            "hdm_worker_images_per_second",
            "Images per second of the latest batch.",
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        self.batch_size = Histogram(
            "hdm_worker_batch_size", "Jobs per sampled batch.", buckets=BATCH_BUCKETS, registry=reg
        )
        self.model_cache = Counter(
            "hdm_worker_model_cache",
            "Pipeline requests: hit (cached) or load (read from disk).",
            ["result"],
            registry=reg,
        )
        self.train_steps_per_second = Gauge(
            "hdm_worker_train_steps_per_second",
            "Optimizer steps per second of the supervised training run (its latest logged step).",
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        self.train_images_per_second = Gauge(
            "hdm_worker_train_images_per_second",
            "Training images per second, all ranks (the latest logged step).",
            multiprocess_mode="livemostrecent",
            registry=reg,
        )
        self.gpu_memory = Gauge(
            "hdm_worker_gpu_memory_bytes",
            "CUDA memory of this worker's pool process: allocated or reserved (only on a CUDA device).",
            ["kind"],
            multiprocess_mode="livemax",
            registry=reg,
        )

    def image_batch(self, jobs: int, images: int, sample_s: float, cache_hit: bool) -> None:
        self.batch_size.observe(jobs)
        self.model_cache.labels("hit" if cache_hit else "load").inc()
        self.images.inc(images)
        if sample_s > 0:
            self.sample_seconds.inc(sample_s)
            self.images_per_second.set(images / sample_s)
        self._gpu_memory()

    def train_records(self, new: list[dict[str, Any]]) -> None:
        """The latest optimizer step's speed from the run's metrics.jsonl records (hdm_core/train/loop.py)."""
        steps = [r for r in new if isinstance(r.get("step_time_s"), int | float) and r["step_time_s"] > 0]
        if steps:
            self.train_steps_per_second.set(1.0 / steps[-1]["step_time_s"])
            self.train_images_per_second.set(float(steps[-1].get("images_per_s") or 0.0))

    def jobs_ended(self, job_ids: Iterable[str]) -> None:
        """Observe the run time and queue wait of each job that is now final (a requeued one is not)."""
        from sqlalchemy import select

        from app.db import as_utc, session_scope
        from app.models import Job

        with session_scope() as session:
            rows = session.execute(
                select(Job.kind, Job.status, Job.created_at, Job.started_at, Job.finished_at).where(
                    Job.id.in_(list(job_ids))
                )
            ).all()
        for kind, status, created, started, finished in rows:
            if status not in FINAL:
                continue
            self.finished.labels(kind, status).inc()
            if started is not None:
                self.queue_wait.labels(kind).observe(
                    max(0.0, (as_utc(started) - as_utc(created)).total_seconds())
                )
                if finished is not None:
                    self.run_time.labels(kind).observe(
                        max(0.0, (as_utc(finished) - as_utc(started)).total_seconds())
                    )

    def _gpu_memory(self) -> None:
        torch = sys.modules.get("torch")  # never imported for this: a CPU worker has nothing to report
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved())


@functools.cache
def metrics() -> WorkerMetrics:
    """The process's metrics (prometheus-client keeps them per process anyway; created on first use)."""
    return WorkerMetrics()


def serve(port: int) -> None:
    """The scrape endpoint of this worker: every pool process's numbers, summed by prometheus-client."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.info("worker metrics on :%d/metrics (%s)", port, os.environ.get(MULTIPROC_ENV))


def process_gone(pid: int) -> None:
    """A pool process exited: its live gauges stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
