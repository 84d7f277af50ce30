"""Helpers shared by routes: pagination, ``Prefer: wait=N``, job event streams (SSE or JSON)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import get_sessionmaker
from app.errors import BadRequest
from app.models import Job
from app.services import jobs, presenter
from app.settings import get_settings

Limit = Annotated[int, Query(ge=1, le=100, description="Page size (newest first).")]
After = Annotated[str | None, Query(max_length=64, description="Cursor: the last id of the previous page.")]
ConfirmOutside = Annotated[
    bool,
    Query(description="Also delete a file outside the service's own folders (models, runs, outputs, data)."),
]
IdemKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", max_length=255, description="Same key + same body returns the first job."
    ),
]
Prefer = Annotated[str | None, Header(alias="Prefer", max_length=200, description="wait=N (N <= 60 seconds)")]
EventsAfter = Annotated[
    int | None, Query(ge=0, le=2**62, description="Events after this id (default: Last-Event-ID).")
]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=64,
        description="Resume an event stream after this event id (a decimal integer; what the stream sent as `id:`).",
    ),
]
MAX_EVENT_ID = 2**62
SSE_POLL_S = 0.2


def prefer_wait(prefer: str | None) -> float:
    if not prefer:
        return 0.0
    m = re.search(r"(?:^|[;,\s])wait\s*=\s*(\d{1,6})", prefer)
    return float(min(int(m.group(1)), get_settings().max_wait_s)) if m else 0.0


def _status(job_id: str) -> str | None:
    with get_sessionmaker()() as session:
        return jobs.status_of(session, job_id)


def _reload(session: Session, job: Job) -> Job:
    session.rollback()  # end the read transaction so the next read sees other writers' commits
    session.refresh(job)
    return job


async def wait_final(session: Session, job: Job, seconds: float) -> Job:
    """Holds the request (not a thread: the event loop sleeps) until the job is final or time runs out."""
    deadline = time.monotonic() + seconds
    status: str | None = job.status
    while status not in jobs.FINAL and time.monotonic() < deadline:
        await asyncio.sleep(0.05 if seconds < 2 else 0.1)
        status = await run_in_threadpool(_status, job.id)
    return await run_in_threadpool(_reload, session, job)


def job_response(body: dict[str, Any], *, final: bool, location: str) -> JSONResponse:
    """202 while the job is in progress, 200 once it is final (Prefer: wait, or an idempotent replay)."""
    return JSONResponse(body, status_code=200 if final else 202, headers={"Location": location})


def _sse(ev_id: int, type_: str, data: Any) -> str:
    return f"id: {ev_id}\nevent: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _poll_events(job_id: str, after: int) -> tuple[list[tuple[int, str, dict[str, Any]]], str]:
    with get_sessionmaker()() as session:
        events = [(e.id, e.type, e.data) for e in jobs.events_after(session, job_id, after)]
        return events, jobs.status_of(session, job_id) or "failed"


async def event_stream(job_id: str, after: int) -> AsyncIterator[str]:
    last = after
    idle = 0.0
    yield "retry: 1000\n\n"
    while True:
        events, status = await run_in_threadpool(_poll_events, job_id, last)
        for ev_id, type_, data in events:
            last = ev_id
            yield _sse(ev_id, type_, {**data, "job_id": job_id})
            if type_ == "done":
                return
        if not events and status in jobs.FINAL:
            more, _ = await run_in_threadpool(_poll_events, job_id, last)
            if not more:  # the final events may have landed between the two reads
                return
            continue
        if events:
            idle = 0.0
        else:
            idle += SSE_POLL_S
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)


def parse_last_event_id(value: str | None) -> int:
    """ASCII digits only (``str.isdigit`` accepts '²', which ``int`` rejects), at most the largest event id."""
    value = (value or "").strip()
    if not value:
        return 0
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_EVENT_ID:
        raise BadRequest(
            f"Last-Event-ID must be a decimal event id between 0 and {MAX_EVENT_ID}.",
            param="Last-Event-ID",
            code="invalid_value",
        )
    return int(value)


def events_response(
    request: Request, session: Session, job: Job, after: int | None, last_event_id: str | None
) -> Any:
    resume_from = parse_last_event_id(last_event_id)
    start = after if after is not None else resume_from
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            event_stream(job.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = jobs.events_after(session, job.id, start, limit=1001)
    return presenter.page([presenter.event(e) for e in events[:1000]], len(events) > 1000)
