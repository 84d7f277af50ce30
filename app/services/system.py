"""System view (slots, workers, queue depths), readiness and the job counts /metrics exposes."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app import queue
from app.db import as_utc, get_engine
from app.migrate import current_revision, head_revision
from app.models import GpuLease, Job
from app.services import storage
from app.services.jobs import stale_before
from app.services.presenter import iso
from app.settings import get_settings

log = logging.getLogger(__name__)


def readiness(session: Session) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    try:
        session.execute(text("select 1"))
        checks["database"] = True
        cur, head = current_revision(get_engine()), head_revision()
        checks["migrations"] = cur == head
        checks["revision"] = {"current": cur, "head": head}
    except Exception as exc:
        log.warning("readiness: database: %s", exc)
        checks["database"] = False
        checks["migrations"] = False
    checks["broker"] = queue.broker_ok(get_settings())
    checks["ready"] = bool(checks["database"] and checks["migrations"] and checks["broker"])
    return checks


def counts(session: Session) -> dict[tuple[str, str], int]:
    rows = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
    return {(k, s): int(n) for k, s, n in rows}


def system_view(session: Session) -> dict[str, Any]:
    settings = get_settings()
    stale = stale_before(settings.stale_after_s)
    leases = {lease.slot: lease for lease in session.scalars(select(GpuLease))}
    gpus = []
    for slot in settings.slot_list:
        lease = leases.get(slot)
        hb = lease.heartbeat_at if lease else None
        live = lease is not None and lease.job_id is not None and hb is not None and as_utc(hb) >= stale  # type: ignore[operator]
        gpus.append(
            {
                "index": slot,
                "job": lease.job_id if live and lease else None,
                "worker": lease.worker if lease else None,
                "heartbeat_at": iso(hb),
            }
        )
    workers = sorted({w for (w,) in session.execute(select(Job.worker).where(Job.status == "running")) if w})
    c = counts(session)
    depth = {kind: c.get((kind, "queued"), 0) for kind in ("image", "train", "dataset")}
    return {
        "object": "system",
        "mode": "embedded" if settings.embedded else "celery",
        "gpus": gpus,
        "workers": workers,
        "queue_depth": depth,
        "running": {kind: c.get((kind, "running"), 0) for kind in ("image", "train", "dataset")},
        "disk": storage.folder_usage(),
    }
