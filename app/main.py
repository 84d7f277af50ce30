"""FastAPI application factory (``app.main:app``). Thin routes; logic lives in ``app.services``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import console, errors
from app.db import session_scope
from app.metrics import ApiMetrics
from app.routes import adapters, datasets, images, models, openai_compat, png_info, system, training
from app.services import webhooks
from app.services.maintenance import MaintenanceThread
from app.services.webhooks import DeliveryThread
from app.settings import DEFAULT_WEBHOOK_SECRET, get_settings

log = logging.getLogger("app")
MAX_BODY_BYTES = (
    1_000_000  # the largest valid request (two 8000-char prompts and a train config) is far smaller
)

# routes whose body may carry an init image and a mask (base64 in JSON, or multipart files counted per part)
UPLOAD_ROUTES = frozenset({"/v1/images", "/v1/images/generations", "/v1/images/edits"})
MULTIPART_ROUTES = frozenset({"/v1/images/edits", "/v1/adapters", "/v1/datasets", "/v1/images/parameters"})


def body_limit(path: str, ctype: bytes = b"") -> int:
    """The most bytes a request body may have; multipart uploads stream to disk, each file refused past its own
    limit by app/multipart.py (naming the field), so they get that limit plus room for the text fields."""
    path = path.rstrip("/")
    settings = get_settings()
    if ctype == b"multipart/form-data":
        files = {
            "/v1/adapters": settings.adapter_upload_bytes,
            "/v1/datasets": settings.dataset_upload_bytes,
            "/v1/images/parameters": settings.upload_max_bytes,
        }
        if path in files:
            return MAX_BODY_BYTES + files[path]
    if path not in UPLOAD_ROUTES:
        return MAX_BODY_BYTES  # JSON bodies, /v1/datasets's included
    return MAX_BODY_BYTES + 2 * (settings.upload_max_bytes * 4 // 3 + 4)  # two files as base64


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # /metrics labels: bounded


class GuardAndCount:
    """Pure ASGI middleware (no per-request task overhead): rejects NUL in URLs, bodies over `body_limit`
    (announced or streamed in chunks), bodies that are not JSON; counts requests by method and route template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        bad = _nul_param(scope)
        if bad is not None:  # PostgreSQL cannot store NUL; reject it here for every route
            await self._reject(
                method,
                start,
                send,
                400,
                "invalid_value",
                "NUL characters are not allowed in the URL.",
                bad or None,
            )
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        path = scope.get("path", "").rstrip("/")
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = body_limit(path, ctype)
        if length.isdigit() and int(length) > limit:
            await self._reject(
                method, start, send, 413, "too_large", f"Request body over {limit} bytes.", None
            )
            return
        if method in ("POST", "PUT", "PATCH") and (
            length not in (b"", b"0") or b"transfer-encoding" in headers
        ):
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if not ctype:  # `curl -d` without -H: a JSON body is still JSON
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
            elif path in MULTIPART_ROUTES and ctype == b"multipart/form-data":
                pass  # files (images.edit, adapter / dataset uploads), each part counted as it streams (app/multipart.py)
            elif ctype != b"application/json" and not ctype.endswith(b"+json"):
                await self._reject(
                    method,
                    start,
                    send,
                    415,
                    "unsupported_media_type",
                    f"Request bodies are JSON: send 'Content-Type: application/json' (got "
                    f"{ctype.decode('latin-1')!r}; curl -d sends a form type unless you add "
                    "-H 'Content-Type: application/json').",
                    "Content-Type",
                )
                return

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, _limited(receive, limit), _send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(method, route, status, time.perf_counter() - start)

    async def _reject(
        self, method: str, start: float, send: Send, status: int, code: str, message: str, param: str | None
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
        self.metrics.observe(method, "rejected", status, time.perf_counter() - start)


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that counts body bytes and stops at ``limit``, so a chunked body without Content-Length
    is refused (413) after at most that much is buffered, not read whole."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:  # FastAPI re-raises its own HTTPException from the body read as is
                raise HTTPException(413, f"Request body over {limit} bytes.")
        return message

    return wrapped


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
    from app.services import adapters, models

    settings = get_settings()
    webhooks.allow_list()  # a malformed HDM_WEBHOOK_ALLOW_HOSTS stops the start, not the first delivery
    keys_required = bool(settings.api_key_list or settings.admin_key_list or settings.require_api_keys)
    with session_scope() as session:
        open_ = not keys_required and auth_open(session)
        if open_:
            log.warning(
                "!!! NO API KEYS CONFIGURED: the API is OPEN to anyone who can reach it. "
                "Set HDM_API_KEYS for any deployment beyond this machine. !!!"
            )
    if settings.webhook_secret == DEFAULT_WEBHOOK_SECRET:
        if not open_:  # anyone could forge this server's webhook signatures
            raise RuntimeError(
                "HDM_WEBHOOK_SECRET is the default 'change-me'; set a secret of your own "
                "(API keys are required, so this is not a throw-away local server)."
            )
        log.warning(
            "HDM_WEBHOOK_SECRET is the default 'change-me': webhook signatures prove nothing. Set one "
            "before anyone else uses this server."
        )
    with session_scope() as session:
        try:
            n = models.scan_models_dir(session)
            log.info("models folder %s: %d checkpoint(s) registered", settings.models_dir, n)
            n = adapters.scan_models_dir(session)
            log.info("models folder %s: %d adapter(s) registered", settings.models_dir, n)
        except Exception as exc:  # database not migrated yet: /readyz says so
            log.warning("model scan skipped: %s", exc)


def create_app() -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _startup()
        threads: list[MaintenanceThread | DeliveryThread] = []
        if settings.maintenance_in_api:
            threads = [MaintenanceThread(), DeliveryThread()]
            for thread in threads:
                thread.start()
        yield
        for thread in threads:
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
    for module in (png_info, images, openai_compat, training, models, adapters, datasets, system):
        app.include_router(module.router)
    console.mount(app)
    metrics = ApiMetrics()
    app.state.metrics = metrics
    app.add_middleware(GuardAndCount, metrics=metrics)
    return app


app = create_app()
