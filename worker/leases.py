"""GPU (or CPU slot) leases in the database, kept alive by heartbeats; a stale lease is free."""

from __future__ import annotations

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import GpuLease
from app.services.jobs import stale_before
from app.settings import get_settings


def ensure_rows(session: Session, slots: list[int]) -> None:
    have = set(session.scalars(select(GpuLease.slot).where(GpuLease.slot.in_(slots))))
    for slot in slots:
        if slot not in have:
            session.add(GpuLease(slot=slot))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()


def acquire(session: Session, slot: int, job_id: str, worker: str) -> bool:
    ensure_rows(session, [slot])
    stale = stale_before(get_settings().stale_after_s)
    now = utcnow()
    res = session.execute(update(GpuLease).where(
        GpuLease.slot == slot,
        or_(GpuLease.job_id.is_(None), GpuLease.job_id == job_id, GpuLease.heartbeat_at < stale),
    ).values(job_id=job_id, worker=worker, acquired_at=now, heartbeat_at=now))
    session.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def beat(session: Session, job_id: str) -> None:
    session.execute(update(GpuLease).where(GpuLease.job_id == job_id).values(heartbeat_at=utcnow()))
    session.commit()


def release(session: Session, job_id: str) -> None:
    session.execute(update(GpuLease).where(GpuLease.job_id == job_id).values(job_id=None, worker=None))
    session.commit()


def free_slots(session: Session, slots: list[int]) -> list[int]:
    ensure_rows(session, slots)
    stale = stale_before(get_settings().stale_after_s)
    rows = session.scalars(select(GpuLease).where(GpuLease.slot.in_(slots)).order_by(GpuLease.slot))
    return [r.slot for r in rows if r.job_id is None or r.heartbeat_at is None
            or r.heartbeat_at.replace(tzinfo=stale.tzinfo) < stale]
