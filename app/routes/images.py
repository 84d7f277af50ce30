"""/v1/images: create, get, list, cancel, delete, events, files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep, SessionDep
from app.responses import EventList, ImageJob, ImageJobDeleted, ImageJobList
from app.routes.common import (
    After,
    EventsAfter,
    IdemKey,
    LastEventId,
    Limit,
    Prefer,
    events_response,
    job_response,
    prefer_wait,
    wait_final,
)
from app.schemas import ImageRequest
from app.services import images, jobs, presenter, storage

router = APIRouter(prefix="/v1/images", tags=["images"])
JobId = Annotated[str, PathParam(max_length=64)]
StatusFilter = Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")]


@router.post(
    "",
    status_code=202,
    response_model=ImageJob,
    responses={200: {"model": ImageJob, "description": "finished within Prefer: wait"}},
)
async def create_image(
    req: ImageRequest,
    request: Request,
    owner: CallerDep,
    session: SessionDep,
    idempotency_key: IdemKey = None,
    prefer: Prefer = None,
) -> Any:
    job, _ = await run_in_threadpool(
        images.create, session, req, owner=owner, idempotency_key=idempotency_key
    )
    wait = prefer_wait(prefer)
    if wait:
        job = await wait_final(session, job, wait)
    body = await run_in_threadpool(presenter.image_job, session, job, str(request.base_url))
    return job_response(body, final=job.status in jobs.FINAL, location=f"/v1/images/{job.id}")


@router.get("", response_model=ImageJobList)
def list_images(
    request: Request,
    owner: CallerDep,
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
    status: StatusFilter = None,
) -> Any:
    rows, more = jobs.list_jobs(session, "image", owner, limit, after, status)
    base = str(request.base_url)
    return presenter.page([presenter.image_job(session, j, base) for j in rows], more)


@router.get("/{job_id}", response_model=ImageJob)
async def get_image(
    job_id: JobId, request: Request, owner: CallerDep, session: SessionDep, prefer: Prefer = None
) -> Any:
    wait = prefer_wait(prefer)
    if not wait:  # the common case: one thread hop
        return await run_in_threadpool(_get_view, session, job_id, owner, str(request.base_url))
    job = await run_in_threadpool(jobs.get_job, session, job_id, "image", owner)
    job = await wait_final(session, job, wait)
    return await run_in_threadpool(presenter.image_job, session, job, str(request.base_url))


def _get_view(session: Session, job_id: str, owner: str, base: str) -> dict[str, Any]:
    return presenter.image_job(session, jobs.get_job(session, job_id, "image", owner), base)


@router.post("/{job_id}/cancel", response_model=ImageJob)
def cancel_image(job_id: JobId, request: Request, owner: CallerDep, session: SessionDep) -> Any:
    job = jobs.cancel(session, jobs.get_job(session, job_id, "image", owner))
    return presenter.image_job(session, job, str(request.base_url))


@router.delete("/{job_id}", response_model=ImageJobDeleted)
def delete_image(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    """A finished job and its files (outputs, the uploads no other queued or running job needs); 409 while it runs."""
    removed = storage.delete_image_job(session, jobs.get_job(session, job_id, "image", owner))
    return {"id": job_id, "object": "image_job", "deleted": True, "files_deleted": removed}


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def image_events(
    job_id: JobId,
    request: Request,
    owner: CallerDep,
    session: SessionDep,
    after: EventsAfter = None,
    last_event_id: LastEventId = None,
) -> Any:
    """Progress as Server-Sent Events (``Accept: text/event-stream``) or a JSON list; ``Last-Event-ID`` resumes."""
    return events_response(
        request, session, jobs.get_job(session, job_id, "image", owner), after, last_event_id
    )


@router.get(
    "/{job_id}/files/{index}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}}},
)
def image_file(
    job_id: JobId, index: Annotated[int, PathParam(ge=0, le=7)], owner: CallerDep, session: SessionDep
) -> Any:
    jobs.get_job(session, job_id, "image", owner)
    path, media_type = images.image_file(session, job_id, index)
    return FileResponse(path, media_type=media_type)
