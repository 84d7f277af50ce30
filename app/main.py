"""FastAPI application factory (``app.main:app``). Thin routes; logic lives in ``app.services``."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors
from app.db import session_scope
from app.routes import datasets, images, models, openai_compat, system, training
from app.settings import get_settings

log = logging.getLogger("app")


class HttpStats:
    """Request counters for /metrics (pure ASGI middleware: no per-request task overhead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counts[(scope["method"], route, status)] += 1
            self.seconds[(scope["method"], route)] += time.perf_counter() - start


def _startup() -> None:
    from app.auth import auth_open
    from app.services import checkpoints

    settings = get_settings()
    with session_scope() as session:
        if auth_open(session):
            log.warning("!!! NO API KEYS CONFIGURED: the API is OPEN to anyone who can reach it. "
                        "Set HDM_API_KEYS for any deployment beyond this machine. !!!")
        try:
            n = checkpoints.scan_models_dir(session)
            log.info("models folder %s: %d checkpoint(s) registered", settings.models_dir, n)
        except Exception as exc:  # database not migrated yet: /readyz says so
            log.warning("model scan skipped: %s", exc)


def create_app() -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _startup()
        thread = None
        if settings.maintenance_in_api:
            from app.services.maintenance import MaintenanceThread

            thread = MaintenanceThread()
            thread.start()
        yield
        if thread is not None:
            thread.stop()

    app = FastAPI(title="HDM Serve", version="1.0.0", lifespan=lifespan,
                  description="Train and serve HDM (XUT flow-matching text-to-image) models on your own GPUs. "
                              "Auth: `Authorization: Bearer <key>`. Errors: "
                              '`{"error": {"code", "message", "param"}}`.')
    errors.install(app)
    for module in (images, openai_compat, training, models, datasets, system):
        app.include_router(module.router)
    stats = HttpStats(app.router)  # placeholder replaced below; kept on state for /metrics
    app.state.http_stats = stats
    app.add_middleware(_StatsMiddleware, stats=stats)
    return app


class _StatsMiddleware:
    def __init__(self, app: ASGIApp, stats: HttpStats) -> None:
        stats.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stats(scope, receive, send)


app = create_app()
