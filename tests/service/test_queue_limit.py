"""The per-key queue limit under a burst of simultaneous creates (issue 10, item 2): a real uvicorn API on
PostgreSQL (and on SQLite in embedded mode) with no worker, so every admitted job stays queued."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_stack import API_KEY, Stack, drop_queues, own_database, stack_env

LIMIT = 20
BURST = 50


@pytest.fixture(params=["postgresql", "sqlite"])
def limited_api(
    request: pytest.FixtureRequest, tmp_path: Path, assets: dict[str, Path], pg_admin: Any, redis_url: str
) -> Iterator[Stack]:
    prefix = f"hdmq{secrets.token_hex(4)}"  # nothing consumes this prefix's queues
    with contextlib.ExitStack() as cleanup:
        if request.param == "postgresql":
            env = stack_env(
                tmp_path, assets, cleanup.enter_context(own_database(pg_admin)), redis_url, prefix
            )
            cleanup.callback(drop_queues, redis_url, prefix)
        else:
            env = stack_env(tmp_path, assets, f"sqlite:///{tmp_path / 'hdm.db'}", "db://", prefix)
        env["HDM_QUEUE_LIMIT"] = str(LIMIT)
        s = Stack(env, tmp_path, API_KEY)
        cleanup.callback(s.stop)
        s.migrate()
        s.start_api()
        yield s


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
