"""Health, readiness, system view and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from app.deps import CallerDep, SessionDep
from app.responses import Health, Readiness, System
from app.services import system

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


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, session: SessionDep) -> Any:
    stats = request.app.state.http_stats
    return PlainTextResponse(
        system.metrics_text(session, stats.counts, stats.seconds), media_type="text/plain; version=0.0.4"
    )
