"""Cancel, worker death and broker loss, against the real stack."""

from __future__ import annotations

import json
import signal
import time

import redis
from service_stack import Stack

SMALL = {"width": 32, "height": 32, "steps": 2}


def _wait_running(s: Stack, job_id: str, min_step: int = 1, timeout: float = 60) -> dict:
    return s.wait_job(job_id, ("running",), timeout=timeout, pred=lambda j: j["progress"]["step"] >= min_step)


def test_cancel_running_job_stops_within_a_step_and_worker_continues(live_worker: Stack) -> None:
    s = live_worker
    with s.client() as c:
        job = c.post("/v1/images", json={"prompt": "slow", "width": 64, "height": 64, "steps": 200}).json()
        running = _wait_running(s, job["id"], min_step=2)
        t0 = time.monotonic()
        r = c.post(f"/v1/images/{job['id']}/cancel")
        assert r.status_code == 200, r.text
        done = s.wait_job(job["id"], timeout=30)
        elapsed = time.monotonic() - t0
        assert done["status"] == "cancelled"
        # one 64x64 step takes ~0.5 s on one CPU thread: the sampler stopped at the next step boundary
        assert elapsed < 5, elapsed
        assert running["progress"]["step"] <= done["progress"]["step"] < 200
        assert c.post(f"/v1/images/{job['id']}/cancel").status_code == 200  # idempotent
        nxt = c.post("/v1/images", json={"prompt": "next", **SMALL}, headers={"Prefer": "wait=30"})
        assert nxt.status_code == 200 and nxt.json()["status"] == "succeeded"


def test_cancel_queued_job_is_immediate(stack: Stack) -> None:
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    with stack.client() as c:
        job = c.post("/v1/images", json={"prompt": "never runs", **SMALL}).json()
        assert job["status"] == "queued" and job["queue_position"] == 0
        r = c.post(f"/v1/images/{job['id']}/cancel")
        assert r.json()["status"] == "cancelled"
    stack.start_worker(0)
    time.sleep(3)  # the worker receives the message and must skip it
    with stack.client() as c:
        again = c.get(f"/v1/images/{job['id']}").json()
        assert again["status"] == "cancelled" and again["started_at"] is None and again["attempts"] == 0


def test_worker_sigkill_mid_job_is_retried(live_worker: Stack) -> None:
    s = live_worker
    with s.client() as c:
        job = c.post(
            "/v1/images", json={"prompt": "survive", "width": 64, "height": 64, "steps": 16, "seed": 5}
        ).json()
        _wait_running(s, job["id"], min_step=2)
        for p in list(s.workers):
            s.kill_worker(p, signal.SIGKILL)  # the whole worker (main + pool child), no cleanup
        s.start_worker(0)
        done = s.wait_job(job["id"], timeout=90)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = c.get(f"/v1/images/{job['id']}/events").json()["data"]
        reasons = [e["data"].get("reason") for e in events if e["type"] == "status"]
        assert "worker_lost" in reasons
        assert [im["index"] for im in done["images"]] == [0]


def _queued_jobs(r: redis.Redis, key: str) -> list[str]:
    """The job ids of the messages waiting in a Celery queue (task id = "<job id>.<attempt>")."""
    return [json.loads(m)["headers"]["id"].rsplit(".", 1)[0] for m in r.lrange(key, 0, -1)]


def test_broker_flush_loses_no_queued_job(stack: Stack, redis_url: str, queue_prefix: str) -> None:
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    r = redis.Redis.from_url(redis_url)
    key = f"{queue_prefix}.images"
    with stack.client() as c:
        ids = [c.post("/v1/images", json={"prompt": f"flush {i}", **SMALL}).json()["id"] for i in range(3)]
        # Only this test's jobs are counted: a killed worker of an earlier test can leave a duplicate message of a
        # finished job behind (harmless: claiming is atomic), which is not what this test is about.
        assert sorted(j for j in _queued_jobs(r, key) if j in ids) == sorted(ids)
        r.flushdb()  # this session's Redis db only (FLUSHALL would hit parallel runs); same effect for us
        assert r.llen(key) == 0
        deadline = time.monotonic() + 10  # maintenance notices the broker lost its state and publishes again
        while not set(ids) <= set(_queued_jobs(r, key)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(j for j in _queued_jobs(r, key) if j in ids) == sorted(ids)  # each once
        stack.start_worker(0)
        for job_id in ids:
            assert stack.wait_job(job_id, timeout=60)["status"] == "succeeded"
