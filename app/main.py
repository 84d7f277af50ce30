"""FastAPI application factory (``app.main:app``). Thin routes; logic lives in ``app.services``."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import console, errors
from app.db import session_scope
from app.routes import datasets, images, models, openai_compat, system, training
from app.settings import get_settings

log = logging.getLogger("app")
MAX_BODY_BYTES = (
    1_000_000  # the largest valid request (two 8000-char prompts and a train config) is far smaller
)

# routes whose body may carry an init image and a mask (base64 in JSON, or multipart files counted per part)
UPLOAD_ROUTES = frozenset({"/v1/images", "/v1/images/generations", "/v1/images/edits"})


def body_limit(path: str) -> int:
    if path.rstrip("/") not in UPLOAD_ROUTES:
        return MAX_BODY_BYTES
    return MAX_BODY_BYTES + 2 * (get_settings().upload_max_bytes * 4 // 3 + 4)  # two files as base64


class HttpStats:
    """Request counters for /metrics."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)


class GuardAndCount:
    """Pure ASGI middleware (no per-request task overhead): rejects NUL in URLs, counts requests."""

    def __init__(self, app: ASGIApp, stats: HttpStats) -> None:
        self.app = app
        self.counts, self.seconds = stats.counts, stats.seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        bad = _nul_param(scope)
        if bad is not None:  # PostgreSQL cannot store NUL; reject it here for every route
            await self._reject(
                scope, send, 400, "invalid_value", "NUL characters are not allowed in the URL.", bad or None
            )
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        limit = body_limit(scope.get("path", ""))
        if length.isdigit() and int(length) > limit:
            await self._reject(scope, send, 413, "too_large", f"Request body over {limit} bytes.", None)
            return

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

    async def _reject(
        self, scope: Scope, send: Send, status: int, code: str, message: str, param: str | None
    ) -> None:
        body = json.dumps(errors.error_body(code, message, param)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self.counts[(scope["method"], "rejected", status)] += 1


def _nul_param(scope: Scope) -> str | None:
    """'' for a NUL in the path, the parameter name for one in the query, None when there is none."""
    if "\x00" in scope.get("path", ""):
        return ""
    raw = scope.get("query_string", b"")
    if b"%00" not in raw.lower() and b"\x00" not in raw:
        return None
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            return key.replace("\x00", "") or ""
    return None


def _startup() -> None:
    from app.auth import auth_open
    from app.services import models

    settings = get_settings()
    with session_scope() as session:
        if auth_open(session):
            log.warning(
                "!!! NO API KEYS CONFIGURED: the API is OPEN to anyone who can reach it. "
                "Set HDM_API_KEYS for any deployment beyond this machine. !!!"
            )
        try:
            n = models.scan_models_dir(session)
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

    app = FastAPI(
        title="HDM Serve",
        version="1.0.0",
        lifespan=lifespan,
        description="Train and serve HDM (XUT flow-matching text-to-image) models on your own GPUs. "
        "Auth: `Authorization: Bearer <key>`. Errors: "
        '`{"error": {"code", "message", "param"}}`.',
    )
    errors.install(app)
    for module in (images, openai_compat, training, models, datasets, system):
        app.include_router(module.router)
    console.mount(app)
    stats = HttpStats()
    app.state.http_stats = stats
    app.add_middleware(GuardAndCount, stats=stats)
    return app


app = create_app()
