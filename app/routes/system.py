"""Health, readiness, system view and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.auth import require_admin, require_caller
from app.deps import CallerDep, SessionDep
from app.metrics import CONTENT_TYPE
from app.responses import Health, Readiness, System
from app.services import system
from app.settings import get_settings

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}}
)
def readyz(session: SessionDep) -> Any:
    checks = system.readiness(session)
    return JSONResponse(checks, status_code=200 if checks["ready"] else 503)


@router.get("/v1/system", response_model=System)
def system_info(_owner: CallerDep, session: SessionDep) -> Any:
    return system.system_view(session)


def metrics_access(request: Request, session: SessionDep) -> None:
    """An admin key, unless HDM_METRICS_OPEN (a scraper on a private network) or the server is open."""
    if not get_settings().metrics_open:
        require_admin(require_caller(request, session))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(metrics_access)])
def metrics(request: Request, session: SessionDep) -> Any:
    """Prometheus exposition (app/metrics.py); the workers' metrics are on their own endpoints (worker/metrics.py)."""
    text = request.app.state.metrics.render(system.counts(session))
    return Response(text, media_type=CONTENT_TYPE)
