"""GPU (or CPU slot) leases in the database, kept alive by heartbeats; a stale lease is free. The scheduler
(app/services/training.py) reserves slots for train jobs, workers acquire and release them."""

from __future__ import annotations

from sqlalchemy import ColumnElement, or_, select, update
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


def _free() -> ColumnElement[bool]:
    """A slot is free when no job holds it or its holder stopped beating."""
    stale = stale_before(get_settings().stale_after_s)
    return or_(GpuLease.job_id.is_(None), GpuLease.heartbeat_at.is_(None), GpuLease.heartbeat_at < stale)


def free_slots(session: Session, slots: list[int]) -> list[int]:
    ensure_rows(session, slots)
    return list(
        session.scalars(
            select(GpuLease.slot).where(GpuLease.slot.in_(slots), _free()).order_by(GpuLease.slot)
        )
    )


def reserve(session: Session, slot: int, job_id: str) -> bool:
    """Hold a free slot for a scheduled train job until its worker acquires it (no commit)."""
    now = utcnow()
    res = session.execute(
        update(GpuLease)
        .where(GpuLease.slot == slot, _free())
        .values(job_id=job_id, worker=None, acquired_at=now, heartbeat_at=now)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def acquire(session: Session, slot: int, job_id: str, worker: str) -> bool:
    ensure_rows(session, [slot])
    now = utcnow()
    res = session.execute(
        update(GpuLease)
        .where(GpuLease.slot == slot, or_(GpuLease.job_id == job_id, _free()))
        .values(job_id=job_id, worker=worker, acquired_at=now, heartbeat_at=now)
    )
    session.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def join(session: Session, slot: int, job_id: str, worker: str) -> bool:
    """A further node of a multi-node job takes a slot reserved for its part: held for the job and taken by no
    worker yet (a second delivery of the node's message must not run the part twice)."""
    res = session.execute(
        update(GpuLease)
        .where(GpuLease.slot == slot, GpuLease.job_id == job_id, GpuLease.worker.is_(None))
        .values(worker=worker, acquired_at=utcnow(), heartbeat_at=utcnow())
    )
    session.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def beat(session: Session, job_ids: list[str] | str, *, worker: str | None = None) -> None:
    """``worker``: only the leases that worker took and those no worker took yet (a multi-node job's node 0 keeps
    the parts of nodes that have not joined; a joined node beats its own, so its death shows as a stale lease)."""
    ids = [job_ids] if isinstance(job_ids, str) else job_ids
    cond = [GpuLease.job_id.in_(ids)]
    if worker is not None:
        cond.append(or_(GpuLease.worker.is_(None), GpuLease.worker == worker))
    session.execute(update(GpuLease).where(*cond).values(heartbeat_at=utcnow()))
    session.commit()


def release(session: Session, job_id: str, *, worker: str | None = None) -> None:
    """Every lease of the job, or with ``worker`` only the ones that worker took (a node leaving its part)."""
    cond = [GpuLease.job_id == job_id]
    if worker is not None:
        cond.append(GpuLease.worker == worker)
    session.execute(update(GpuLease).where(*cond).values(job_id=None, worker=None))
    session.commit()


def held(session: Session, job_id: str) -> list[GpuLease]:
    return list(session.scalars(select(GpuLease).where(GpuLease.job_id == job_id).order_by(GpuLease.slot)))
