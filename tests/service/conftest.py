"""Service test fixtures: a PostgreSQL database and a Redis db number per session, a tiny pixel-space model and
toy text encoder, and the real stack (uvicorn API + Celery worker subprocesses)."""

from __future__ import annotations

import random
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_stack import API_KEY, Stack, own_database, stack_env  # noqa: E402


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True, connect_timeout=5
        )
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required (make services): {exc}")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def pg_url(pg_admin: Any) -> Iterator[str]:
    with own_database(pg_admin) as url:
        yield url


@pytest.fixture
def fresh_pg_url(pg_admin: Any) -> Iterator[str]:
    with own_database(pg_admin) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """An empty Redis db number (1..14) for this session: the broker-loss test flushes it."""
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0").ping()
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"Redis at 127.0.0.1:6379 is required (make services): {exc}")
    candidates = random.sample(range(1, 15), 14)
    db = next(
        (n for n in candidates if redis.Redis.from_url(f"redis://127.0.0.1:6379/{n}").dbsize() == 0),
        candidates[0],
    )
    url = f"redis://127.0.0.1:6379/{db}"
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    return f"hdmt{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pixel-space XUT checkpoint in a models folder, and a toy text encoder."""
    import hdm_core
    from hdm_core.codec import PixelCodec
    from hdm_demo.text_encoder import build_toy_text_encoder

    base = tmp_path_factory.mktemp("assets")
    models = base / "models"
    models.mkdir()
    model = hdm_core.XUT(hdm_core.PRESETS["xut-pixel-debug"])
    hdm_core.save_checkpoint(models / "tiny.safetensors", model, codec=PixelCodec())
    te = build_toy_text_encoder(base / "te")
    return {"models": models, "te": Path(te), "model": models / "tiny.safetensors"}


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_url: str,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:

    tmp = tmp_path_factory.mktemp("stack")
    s = Stack(stack_env(tmp, assets, pg_url, redis_url, queue_prefix), tmp, API_KEY)
    s.migrate()
    s.start_api()
    s.start_worker(0)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def live_worker(stack: Stack) -> Stack:
    """Make sure one worker is running (a previous test may have killed it)."""
    if not any(p.poll() is None for p in stack.workers):
        stack.start_worker(0)
    return stack


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "stack" in getattr(item, "funcargs", {}):
        rep.sections.append(("stack logs", item.funcargs["stack"].logs()))
