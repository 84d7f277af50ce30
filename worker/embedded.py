"""Embedded worker (``HDM_BROKER_URL=db://``): the jobs table is the queue. It runs the same job functions as the
Celery tasks, plus maintenance, in one process next to the API (``hdm serve``)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from sqlalchemy import select

from app.db import session_scope
from app.models import Job
from app.procutil import parent_gone
from app.services import maintenance
from app.settings import get_settings

log = logging.getLogger(__name__)


def next_job(slot: int) -> tuple[str, str] | None:
    with session_scope() as session:
        row = session.execute(
            select(Job.id, Job.kind, Job.slots).where(Job.status == "queued").order_by(Job.id).limit(200)
        ).all()
    for job_id, kind, slots in row:
        if kind == "train" and not (slots and slots[0] == slot):
            continue  # waits for the scheduler to give it this slot
        return job_id, kind
    return None


def run_one(job_id: str, kind: str, worker: str, slot: int) -> str:
    if kind == "image":
        from worker.images import run_image_job

        return run_image_job(job_id, worker=worker, slot=slot)
    if kind == "merge":
        from worker.merges import run_merge_job

        return run_merge_job(job_id, worker=worker)
    if kind == "dataset":
        from worker.datasets import run_dataset_job

        return run_dataset_job(job_id, worker=worker)
    from worker.training import run_train_job

    _running["train"] = job_id
    try:
        return run_train_job(job_id, worker=worker)
    finally:
        _running.pop("train", None)


_running: dict[
    str, str
] = {}  # "busy": the job being run; "train": the run it supervises (preempted on SIGTERM)


def run_loop(stop: threading.Event, slot: int = 0, poll_s: float = 0.2) -> None:
    settings = get_settings()
    worker = f"embedded-{slot}@{socket.gethostname()}"
    last_maintenance = 0.0
    skipped: dict[str, float] = {}
    log.info("embedded worker %s polling the database", worker)
    while not stop.is_set():
        if parent_gone():  # `hdm serve` died without stopping us (SIGKILL): do not poll forever as an orphan
            log.warning("embedded worker %s: parent process gone, exiting", worker)
            break
        now = time.monotonic()
        if now - last_maintenance >= settings.maintenance_interval_s:
            maintenance.tick()
            last_maintenance = now
        found = next_job(slot)
        if found is None or skipped.get(found[0], 0) > now:
            stop.wait(poll_s)
            continue
        _running["busy"] = found[0]
        try:
            outcome = run_one(found[0], found[1], worker, slot)
        finally:
            _running.pop("busy", None)
        if outcome == "bounced":
            skipped[found[0]] = now + 2.0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()
        if "busy" not in _running:  # idle (polling, maintenance): nothing to finish, leave now
            raise SystemExit(0)
        job = _running.get("train")
        if job:  # like the Celery worker's warm shutdown: the run is preempted, re-queued, resumed later
            from worker.training import PREEMPT

            folder = get_settings().runs_dir / job
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PREEMPT).write_text(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_loop(stop, get_settings().gpu_index or 0)
    log.info("embedded worker stopped")


if __name__ == "__main__":
    main()
