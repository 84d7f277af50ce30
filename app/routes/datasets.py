"""/v1/datasets: register a folder under the data root; validation runs as a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from app.deps import CallerDep, SessionDep
from app.responses import Dataset, DatasetCreated, DatasetList
from app.routes.common import After, IdemKey, Limit
from app.schemas import DatasetRequest
from app.services import datasets, presenter

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=202, response_model=DatasetCreated)
def create_dataset(
    req: DatasetRequest, owner: CallerDep, session: SessionDep, idempotency_key: IdemKey = None
) -> Any:
    ds, job = datasets.create(session, req, owner=owner, idempotency_key=idempotency_key)
    body = {**presenter.dataset(ds), "validation_job": job.id}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/datasets/{ds.id}"})


@router.get("", response_model=DatasetList)
def list_datasets(owner: CallerDep, session: SessionDep, limit: Limit = 20, after: After = None) -> Any:
    rows, more = datasets.list_(session, owner, limit, after)
    return presenter.page([presenter.dataset(d) for d in rows], more)


@router.get("/{dataset_id}", response_model=Dataset)
def get_dataset(
    dataset_id: Annotated[str, PathParam(max_length=64)], owner: CallerDep, session: SessionDep
) -> Any:
    return presenter.dataset(datasets.get(session, dataset_id, owner))
