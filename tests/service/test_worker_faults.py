"""A worker SIGKILLed again and again while image jobs wait (issue 10, item 1 and its must-show), against the real
stack: uvicorn API (maintenance thread) + PostgreSQL + Redis + Celery worker processes.

After a crash the restarted worker finds its slot still leased to the dead job and bounces queued jobs with a
countdown; those messages sit in the worker as ETA messages (Redis ``unacked``). Killed again there, they stay in
``unacked`` until the visibility timeout (hours). The database is the truth: the reconciler must publish such jobs
again, and each job must still run to success exactly once."""

from __future__ import annotations

import random
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_stack import API_KEY, Stack, drop_queues, own_database, stack_env

N_JOBS = 10
BODY = {"width": 32, "height": 32, "steps": 6}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path], pg_admin: Any, redis_url: str
) -> Iterator[Stack]:
    prefix = f"hdmf{secrets.token_hex(4)}"
    tmp = tmp_path_factory.mktemp("faults")
    with own_database(pg_admin) as url:
        env = stack_env(tmp, assets, url, redis_url, prefix)
        # the broker-vs-database scan every 2 s (default 60 s) keeps the test short; the point is that it happens
        # at all, not after the 6 h visibility timeout. Attempts are not what this test is about: no job fails for
        # having been hit by several of the kills.
        env.update({"HDM_RECONCILE_INTERVAL_S": "2", "HDM_MAX_ATTEMPTS": "20"})
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            yield s
        finally:
            s.stop()
            drop_queues(redis_url, prefix)


def _newest_worker_log(s: Stack) -> Path:
    return sorted(s.workdir.glob("*-worker0.log"))[-1]


def _wait_log(s: Stack, needle: str, after: int, timeout: float = 90) -> int:
    """Wait until the newest worker log has `needle` past byte offset `after`; returns the log's size then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _newest_worker_log(s).read_bytes()
        if needle.encode() in text[after:]:
            return len(text)
        time.sleep(0.02)
    raise AssertionError(f"worker never logged {needle!r}\n{s.logs()}")


def _kill_all(s: Stack) -> None:
    for p in list(s.workers):
        s.kill_worker(p, signal.SIGKILL)  # the whole process group, no cleanup


def _statuses(s: Stack, ids: list[str]) -> dict[str, str]:
    with s.client() as c:
        return {i: c.get(f"/v1/images/{i}").json()["status"] for i in ids}


def test_repeated_sigkill_strands_no_job_and_runs_each_once(stack: Stack) -> None:
    s = stack
    rng = random.Random(secrets.randbits(32))
    with s.client() as c:
        ids = [
            c.post("/v1/images", json={"prompt": f"fault {i}", "seed": i, **BODY}).json()["id"]
            for i in range(N_JOBS)
        ]

    # kill 1: in the middle of a job (its lease stays held until it goes stale)
    s.start_worker(0)
    _wait_log(s, "received", 0)
    time.sleep(rng.uniform(0.5, 2.0))
    with s.client() as c:
        deadline = time.monotonic() + 60
        while not any(
            j["status"] == "running" for j in c.get("/v1/images", params={"limit": 50}).json()["data"]
        ):
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.05)
    _kill_all(s)

    # kills 2 and 3: right after the restarted worker receives a task (a bounce: the slot is still leased)
    for _ in range(2):
        s.start_worker(0)
        _wait_log(s, "received", 0)
        time.sleep(rng.uniform(0.0, 1.0))
        _kill_all(s)

    # kill 4: at a random point after a restart
    s.start_worker(0)
    time.sleep(rng.uniform(1.0, 6.0))
    _kill_all(s)

    s.start_worker(0)
    restarted = time.monotonic()
    left: dict[str, str] = {}
    while time.monotonic() - restarted < 60:
        left = {i: st for i, st in _statuses(s, ids).items() if st != "succeeded"}
        if not left or any(st in ("failed", "cancelled") for st in left.values()):
            break
        time.sleep(0.5)
    assert not left, f"not succeeded within 60 s of the last restart: {left}\n{s.logs()}"

    outputs = Path(s.env["HDM_OUTPUTS_DIR"])
    with s.client() as c:
        for job_id in ids:
            job = c.get(f"/v1/images/{job_id}").json()
            assert [im["index"] for im in job["images"]] == [0], job  # one image row
            assert [p.name for p in (outputs / job_id).iterdir()] == ["0.png"], job_id  # one file
            events = c.get(f"/v1/images/{job_id}/events", params={"limit": 500}).json()["data"]
            done = [e for e in events if e["type"] == "done"]
            succeeded = [e for e in events if e["type"] == "status" and e["data"]["status"] == "succeeded"]
            assert len(done) == 1 and done[0]["data"]["status"] == "succeeded", events  # one done event
            assert len(succeeded) == 1, events  # it succeeded exactly once
