"""Helpers shared by routes: pagination, ``Prefer: wait=N``, job event streams (SSE or JSON)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.db import get_sessionmaker
from app.models import Job
from app.services import jobs
from app.settings import get_settings

Limit = Annotated[int, Query(ge=1, le=100, description="Page size (newest first).")]
After = Annotated[str | None, Query(max_length=64, description="Cursor: the last id of the previous page.")]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                       description="Same key + same body returns the first job.")]
Prefer = Annotated[str | None, Header(alias="Prefer", max_length=200, description="wait=N (N <= 60 seconds)")]
SSE_POLL_S = 0.2


def prefer_wait(prefer: str | None) -> float:
    if not prefer:
        return 0.0
    m = re.search(r"(?:^|[;,\s])wait\s*=\s*(\d{1,6})", prefer)
    return float(min(int(m.group(1)), get_settings().max_wait_s)) if m else 0.0


def wait_final(session: Session, job: Job, seconds: float) -> Job:
    deadline = time.monotonic() + seconds
    while job.status not in jobs.FINAL and time.monotonic() < deadline:
        time.sleep(0.05 if seconds < 2 else 0.1)
        session.rollback()  # end the read transaction so the next read sees other writers' commits
        session.refresh(job)
    return job


def job_response(body: dict[str, Any], *, created: bool, final: bool, location: str) -> JSONResponse:
    status = 200 if final else 202
    del created
    return JSONResponse(body, status_code=status, headers={"Location": location})


def _sse(ev_id: int, type_: str, data: Any) -> str:
    return f"id: {ev_id}\nevent: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def event_stream(job_id: str, after: int) -> Iterator[str]:
    last = after
    idle = 0.0
    yield "retry: 1000\n\n"
    while True:
        maker = get_sessionmaker()
        with maker() as session:
            events = jobs.events_after(session, job_id, last)
            job = session.get(Job, job_id)
            status = job.status if job else "failed"
        for ev in events:
            last = ev.id
            yield _sse(ev.id, ev.type, {**ev.data, "job_id": job_id})
            if ev.type == "done":
                return
        if not events and status in jobs.FINAL:
            with maker() as session:  # the final events may have landed between the two reads
                if not jobs.events_after(session, job_id, last):
                    return
            continue
        if events:
            idle = 0.0
        else:
            idle += SSE_POLL_S
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
        time.sleep(SSE_POLL_S)


def events_response(request: Request, session: Session, job: Job, after: int | None) -> Any:
    last_id = request.headers.get("last-event-id", "")
    start = after if after is not None else (int(last_id) if last_id.strip().isdigit() else 0)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(event_stream(job.id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = jobs.events_after(session, job.id, start, limit=1001)
    return {"object": "list", "data": [jobs.event_view(e) for e in events[:1000]], "has_more": len(events) > 1000}
