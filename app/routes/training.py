"""/v1/train-jobs: create, list, get, cancel, resume, events, checkpoints, samples."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from app.deps import CallerDep, SessionDep
from app.responses import EventList, ModelList, SampleList, TrainJob, TrainJobList
from app.routes.common import After, EventsAfter, IdemKey, Limit, events_response
from app.schemas import TrainRequest
from app.services import jobs, presenter, training

router = APIRouter(prefix="/v1/train-jobs", tags=["training"])
JobId = Annotated[str, PathParam(max_length=64)]


@router.post("", status_code=202, response_model=TrainJob)
def create_train_job(
    req: TrainRequest, owner: CallerDep, session: SessionDep, idempotency_key: IdemKey = None
) -> Any:
    job, _ = training.create(session, req, owner=owner, idempotency_key=idempotency_key)
    return JSONResponse(
        presenter.train_job(session, job), status_code=202, headers={"Location": f"/v1/train-jobs/{job.id}"}
    )


@router.get("", response_model=TrainJobList)
def list_train_jobs(owner: CallerDep, session: SessionDep, limit: Limit = 20, after: After = None) -> Any:
    rows, more = jobs.list_jobs(session, "train", owner, limit, after)
    return presenter.page([presenter.train_job(session, j) for j in rows], more)


@router.get("/{job_id}", response_model=TrainJob)
def get_train_job(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    return presenter.train_job(session, jobs.get_job(session, job_id, "train", owner))


@router.post("/{job_id}/cancel", response_model=TrainJob)
def cancel_train_job(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    job = jobs.cancel(session, jobs.get_job(session, job_id, "train", owner))
    return presenter.train_job(session, job)


@router.post("/{job_id}/resume", status_code=202, response_model=TrainJob)
def resume_train_job(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    job = training.resume(session, jobs.get_job(session, job_id, "train", owner))
    return JSONResponse(presenter.train_job(session, job), status_code=202)


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def train_events(
    job_id: JobId, request: Request, owner: CallerDep, session: SessionDep, after: EventsAfter = None
) -> Any:
    return events_response(request, session, jobs.get_job(session, job_id, "train", owner), after)


@router.get("/{job_id}/checkpoints", response_model=ModelList)
def train_checkpoints(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    jobs.get_job(session, job_id, "train", owner)
    rows = presenter.job_checkpoints(session, job_id)
    return presenter.page([presenter.model(c) for c in rows], False)


@router.get("/{job_id}/samples", response_model=SampleList)
def train_samples(job_id: JobId, owner: CallerDep, session: SessionDep) -> Any:
    jobs.get_job(session, job_id, "train", owner)
    return presenter.page([{"name": name} for name in training.sample_files(job_id)], False)
