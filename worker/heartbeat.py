"""Background heartbeat for the jobs a worker is running (job rows + their GPU leases): one job, or the image jobs
of one batch (worker/batcher.py)."""

from __future__ import annotations

import logging
import threading

from app.db import session_scope
from app.services import jobs, leases
from app.settings import get_settings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, job_ids: str | list[str], *, lease_worker: str | None = None) -> None:
        self.job_ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        self.lease_worker = lease_worker  # leases.beat(worker=...): node 0 of a multi-node job
        super().__init__(name=f"heartbeat-{self.job_ids[0]}", daemon=True)
        self.stop_event = threading.Event()

    def run(self) -> None:
        interval = get_settings().heartbeat_s
        while not self.stop_event.wait(interval):
            try:
                with session_scope() as session:
                    ids = list(self.job_ids)
                    for job_id in ids:
                        jobs.heartbeat(session, job_id)
                    leases.beat(session, ids, worker=self.lease_worker)
            except Exception as exc:
                log.warning("heartbeat for %s failed: %s", self.job_ids, exc)

    def add(self, job_ids: list[str]) -> None:
        """Jobs that joined the running one (a batch's companions, claimed after it started)."""
        self.job_ids.extend(job_ids)

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_event.set()
        self.join(timeout=5)
