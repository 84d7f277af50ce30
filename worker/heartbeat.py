"""Background heartbeat for the job a worker is running (job row + its GPU leases)."""

from __future__ import annotations

import logging
import threading

from app.db import session_scope
from app.services import jobs, leases
from app.settings import get_settings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, job_id: str) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id = job_id
        self.stop_event = threading.Event()

    def run(self) -> None:
        interval = get_settings().heartbeat_s
        while not self.stop_event.wait(interval):
            try:
                with session_scope() as session:
                    jobs.heartbeat(session, self.job_id)
                    leases.beat(session, self.job_id)
            except Exception as exc:
                log.warning("heartbeat for %s failed: %s", self.job_id, exc)

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_event.set()
        self.join(timeout=5)
