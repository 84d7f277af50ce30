"""Health, readiness, system view and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session

from app.auth import require_admin, require_caller, require_key
from app.db import get_session
from app.services import system
from app.settings import get_settings

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: Session = Depends(get_session)) -> Any:
    checks = system.readiness(session)
    return JSONResponse(checks, status_code=200 if checks["ready"] else 503)


@router.get("/v1/system")
def system_info(_owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    return system.system_view(session)


def metrics_access(request: Request, session: Session = Depends(get_session)) -> None:
    """An admin key, unless HDM_METRICS_OPEN (a scraper on a private network) or the server is open."""
    if not get_settings().metrics_open:
        require_admin(require_caller(request, session))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(metrics_access)])
def metrics(request: Request, session: Session = Depends(get_session)) -> Any:
    stats = request.app.state.http_stats
    return PlainTextResponse(system.metrics_text(session, stats.counts, stats.seconds),
                             media_type="text/plain; version=0.0.4")
