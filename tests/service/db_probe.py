"""What the service tests read from and hold in a stack's PostgreSQL database: the recorded worker and batch of each
job, and table locks that stop workers at a known point (so a test decides when they claim, not timing)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


def connect(db_url: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=autocommit)


@dataclass(frozen=True)
class JobRow:
    id: str
    status: str
    worker: str | None
    batch_id: str | None
    batch_size: int | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: dict[str, Any] | None


def job_rows(db_url: str, ids: list[str]) -> list[JobRow]:
    """The jobs as the database recorded them (worker name, result.batch), in the order of ``ids``."""
    with connect(db_url) as conn:
        rows = conn.execute(
            "SELECT id, status, worker, result::jsonb -> 'batch' ->> 'id', (result::jsonb -> 'batch' ->> 'size')::int,"
            " started_at, finished_at, attempts, error::jsonb FROM jobs WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    by_id = {r[0]: JobRow(*r) for r in rows}
    return [by_id[i] for i in ids]


def wait_final(db_url: str, ids: list[str], timeout: float = 180) -> list[JobRow]:
    """Until every job is final (any key's jobs: the database, not one key's view of the API)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = job_rows(db_url, ids)
        if all(r.status in ("succeeded", "failed", "cancelled") for r in rows):
            return rows
        assert time.monotonic() < deadline, [
            r for r in rows if r.status not in ("succeeded", "failed", "cancelled")
        ]
        time.sleep(0.2)


def lock_waiters(db_url: str, like: str) -> int:
    """Sessions of this database waiting on a lock in a statement matching ``like`` (SQL LIKE)."""
    dbname = db_url.rsplit("/", 1)[1]
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' AND query LIKE %s",
            (dbname, like),
        ).fetchone()
    return int(row[0]) if row else 0


def idle_in_transaction(db_url: str, older_than_s: float) -> int:
    """Sessions of this database inside a transaction that waits for its client (a paused process holds its locks)."""
    dbname = db_url.rsplit("/", 1)[1]
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'idle in transaction'"
            " AND xact_start < now() - make_interval(secs => %s)",
            (dbname, older_than_s),
        ).fetchone()
    return int(row[0]) if row else 0


class TableLock:
    """``LOCK TABLE ... IN EXCLUSIVE MODE`` (reads go on, writes wait) until the block ends."""

    def __init__(self, db_url: str, table: str, waiting_like: str) -> None:
        self.db_url, self.table, self.like = db_url, table, waiting_like
        self.conn = connect(db_url, autocommit=False)

    def __enter__(self) -> TableLock:
        self.conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
        return self

    def wait_for(self, n: int, timeout: float = 90) -> None:
        """Until ``n`` writers wait on the lock (exactly: more is an error of the test's premise)."""
        deadline = time.monotonic() + timeout
        while (got := lock_waiters(self.db_url, self.like)) < n:
            assert time.monotonic() < deadline, f"{got} of {n} writers wait on {self.table}"
            time.sleep(0.1)
        assert got == n, f"{got} writers wait on {self.table}, expected {n}"

    def __exit__(self, *_exc: object) -> None:
        self.conn.commit()
        self.conn.close()


@contextlib.contextmanager
def claims_held(db_url: str, slots: list[int]) -> Iterator[TableLock]:
    """Workers that got a job wait at their slot lease (app/services/leases.acquire), before they claim anything;
    ``wait_for(n)``: n workers hold a delivered job. The lease rows exist first, so only the acquiring UPDATE (the
    one that sets acquired_at) waits."""
    with connect(db_url) as conn:
        for s in slots:
            conn.execute("INSERT INTO gpu_leases (slot) VALUES (%s) ON CONFLICT DO NOTHING", (s,))
    with TableLock(db_url, "gpu_leases", "UPDATE gpu_leases SET job_id%acquired_at%") as lock:
        yield lock
