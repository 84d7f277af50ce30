"""/v1/datasets: register a folder under the data root; validation runs as a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.auth import require_key
from app.db import get_session
from app.routes.common import After, IdemKey, Limit
from app.schemas import DatasetRequest
from app.services import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=202)
def create_dataset(req: DatasetRequest, idempotency_key: IdemKey = None, owner: str = Depends(require_key),
                   session: Session = Depends(get_session)) -> Any:
    ds, job = datasets.create(session, req, owner=owner, idempotency_key=idempotency_key)
    body = {**datasets.view(ds), "validation_job": job.id}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/datasets/{ds.id}"})


@router.get("")
def list_datasets(limit: Limit = 20, after: After = None, owner: str = Depends(require_key),
                  session: Session = Depends(get_session)) -> Any:
    rows, more = datasets.list_(session, owner, limit, after)
    return {"object": "list", "data": [datasets.view(d) for d in rows], "has_more": more}


@router.get("/{dataset_id}")
def get_dataset(dataset_id: Annotated[str, PathParam(max_length=64)], owner: str = Depends(require_key),
                session: Session = Depends(get_session)) -> Any:
    return datasets.view(datasets.get(session, dataset_id, owner))
