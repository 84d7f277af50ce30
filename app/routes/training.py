"""/v1/train-jobs: create, list, get, cancel, resume, events, checkpoints, samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session

from app.auth import require_key
from app.db import get_session
from app.errors import NotFound
from app.routes.common import After, IdemKey, LastEventId, Limit, events_response
from app.schemas import TrainRequest
from app.services import checkpoints, jobs, training
from app.settings import get_settings

router = APIRouter(prefix="/v1/train-jobs", tags=["training"])
JobId = Annotated[str, PathParam(max_length=64)]


@router.post("", status_code=202)
def create_train_job(req: TrainRequest, idempotency_key: IdemKey = None, owner: str = Depends(require_key),
                     session: Session = Depends(get_session)) -> Any:
    job, _ = training.create(session, req, owner=owner, idempotency_key=idempotency_key)
    return JSONResponse(training.view(session, job), status_code=202, headers={"Location": f"/v1/train-jobs/{job.id}"})


@router.get("")
def list_train_jobs(limit: Limit = 20, after: After = None, owner: str = Depends(require_key),
                    session: Session = Depends(get_session)) -> Any:
    rows, more = jobs.list_jobs(session, "train", owner, limit, after)
    return {"object": "list", "data": [training.view(session, j) for j in rows], "has_more": more}


@router.get("/{job_id}")
def get_train_job(job_id: JobId, owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    return training.view(session, jobs.get_job(session, job_id, "train", owner))


@router.post("/{job_id}/cancel")
def cancel_train_job(job_id: JobId, owner: str = Depends(require_key),
                     session: Session = Depends(get_session)) -> Any:
    job = jobs.cancel(session, jobs.get_job(session, job_id, "train", owner))
    return training.view(session, job)


@router.post("/{job_id}/resume", status_code=202)
def resume_train_job(job_id: JobId, owner: str = Depends(require_key),
                     session: Session = Depends(get_session)) -> Any:
    job = training.resume(session, jobs.get_job(session, job_id, "train", owner))
    return JSONResponse(training.view(session, job), status_code=202)


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
def train_events(job_id: JobId, request: Request, after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
                 last_event_id: LastEventId = None, owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    return events_response(request, session, jobs.get_job(session, job_id, "train", owner), after,
                           last_event_id)


@router.get("/{job_id}/checkpoints")
def train_checkpoints(job_id: JobId, owner: str = Depends(require_key),
                      session: Session = Depends(get_session)) -> Any:
    jobs.get_job(session, job_id, "train", owner)
    rows = training.job_checkpoints(session, job_id)
    return {"object": "list", "data": [checkpoints.view(c) for c in rows], "has_more": False}


SAMPLE_MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def _samples_folder(job_id: str) -> Path:
    return get_settings().runs_dir / job_id / "samples"


@router.get("/{job_id}/samples")
def train_samples(job_id: JobId, request: Request, owner: str = Depends(require_key),
                  session: Session = Depends(get_session)) -> Any:
    jobs.get_job(session, job_id, "train", owner)
    folder = _samples_folder(job_id)
    files = sorted(p for p in folder.glob("**/*") if p.suffix in SAMPLE_MEDIA and p.is_file()) \
        if folder.is_dir() else []
    base = str(request.base_url).rstrip("/")
    data = []
    for p in files:
        name = p.relative_to(folder).as_posix()
        data.append({"name": name, "url": f"{base}/v1/train-jobs/{job_id}/samples/{name}"})
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{job_id}/samples/{name:path}", response_class=FileResponse,
            responses={200: {"content": {m: {} for m in SAMPLE_MEDIA.values()}}})
def train_sample_file(job_id: JobId, name: Annotated[str, PathParam(max_length=500)],
                      owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    jobs.get_job(session, job_id, "train", owner)
    folder = _samples_folder(job_id).resolve()
    try:
        path = (folder / name).resolve()
        ok = path.is_relative_to(folder) and path.suffix in SAMPLE_MEDIA and path.is_file()
    except (OSError, RuntimeError):
        ok = False
    if not ok:
        raise NotFound(f"Train job {job_id} has no sample {name!r}.", param="name")
    return FileResponse(path, media_type=SAMPLE_MEDIA[path.suffix])
