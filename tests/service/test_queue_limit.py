"""The per-key queue limit under a burst of simultaneous creates (issue 10, item 2): a real uvicorn API on
PostgreSQL (and on SQLite in embedded mode) with no worker, so every admitted job stays queued."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from service_stack import API_KEY, Stack, stack_env

LIMIT = 20
BURST = 50


@pytest.fixture(params=["postgresql", "sqlite"])
def limited_api(
    request: pytest.FixtureRequest, tmp_path: Path, assets: dict[str, Path], pg_admin: Any, redis_url: str
) -> Iterator[Stack]:
    prefix = f"hdmq{secrets.token_hex(4)}"  # nothing consumes this prefix's queues
    name = f"hdm_test_{secrets.token_hex(6)}"
    if request.param == "postgresql":
        pg_admin.execute(f'CREATE DATABASE "{name}"')
        env = stack_env(
            tmp_path, assets, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis_url, prefix
        )
    else:
        env = stack_env(tmp_path, assets, f"sqlite:///{tmp_path / 'hdm.db'}", "db://", prefix)
    env["HDM_QUEUE_LIMIT"] = str(LIMIT)
    s = Stack(env, tmp_path, API_KEY)
    try:
        s.migrate()
        s.start_api()
        yield s
    finally:
        s.stop()
        if request.param == "postgresql":
            pg_admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            r = redis.Redis.from_url(redis_url)
            for key in r.scan_iter(match=f"{prefix}*"):
                r.delete(key)


def test_simultaneous_creates_never_exceed_the_queue_limit(limited_api: Stack) -> None:
    s = limited_api
    barrier = threading.Barrier(BURST)
    codes: list[int] = []
    lock = threading.Lock()

    def post(i: int) -> None:
        with httpx.Client(
            base_url=s.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        ) as c:
            barrier.wait(timeout=30)
            r = c.post("/v1/images", json={"prompt": f"burst {i}", "width": 32, "height": 32, "steps": 2})
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(codes) == BURST, codes
    assert sorted(set(codes)) == [202, 429], codes
    with s.client() as c:
        queued = c.get("/v1/images", params={"limit": 100, "status": "queued"}).json()["data"]
    assert codes.count(202) == LIMIT and len(queued) == LIMIT, (codes.count(202), len(queued))
