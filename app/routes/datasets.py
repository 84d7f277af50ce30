"""/v1/datasets: register a folder under the data root (JSON) or upload an archive (multipart); validation runs as
a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep, SessionDep
from app.multipart import read_form_to_disk
from app.responses import Dataset, DatasetCreated, DatasetList
from app.routes.common import After, IdemKey, Limit
from app.schemas import DatasetRequest
from app.services import dataset_uploads, datasets, presenter
from app.settings import get_settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file", "name"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": ".zip, .tar or .tar.gz"},
        "name": {"type": "string", "maxLength": 300},
        "trigger_word": {"type": "string", "maxLength": 100},
        "repeats": {"type": "integer", "minimum": 1, "maximum": dataset_uploads.MAX_REPEATS},
        "caption": {"type": "string", "enum": ["tagger"]},
    },
}


@router.post(
    "",
    status_code=202,
    response_model=DatasetCreated,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": DatasetRequest.model_json_schema(ref_template="#/components/schemas/{model}")
                },
                "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
            },
        }
    },
)
async def create_dataset(
    request: Request, owner: CallerDep, session: SessionDep, idempotency_key: IdemKey = None
) -> Any:
    """JSON: a folder already under the data root. Multipart: an archive, extracted into the key's private
    dataset (the 202 body's ``upload`` lists what was kept and skipped, and why)."""
    upload: dict[str, Any] | None = None
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        staging = dataset_uploads.staging_dir()
        try:
            form = await read_form_to_disk(request, "file", staging, get_settings().dataset_upload_bytes)
        except BaseException:
            dataset_uploads.discard(staging)
            raise
        ds, job, upload = await run_in_threadpool(
            dataset_uploads.create, session, staging, form.path, form.fields, owner=owner
        )
    else:
        try:
            req = DatasetRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        ds, job = await run_in_threadpool(
            datasets.create, session, req, owner=owner, idempotency_key=idempotency_key
        )
    body = {**presenter.dataset(ds), "validation_job": job.id, **({"upload": upload} if upload else {})}
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


@router.delete("/{dataset_id}")
def delete_dataset(
    dataset_id: Annotated[str, PathParam(max_length=64)], owner: CallerDep, session: SessionDep
) -> Any:
    """Unregister; an uploaded dataset's files are removed. 409 ``dataset_in_use`` while a train job uses it."""
    ds = datasets.get(session, dataset_id, owner)
    dataset_uploads.delete(session, ds)
    return {"id": dataset_id, "object": "dataset", "deleted": True}


@router.get(
    "/{dataset_id}/images/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
def dataset_image(
    dataset_id: Annotated[str, PathParam(max_length=64)],
    name: Annotated[str, PathParam(max_length=300)],
    owner: CallerDep,
    session: SessionDep,
) -> Any:
    """One image of the dataset (the upload report's ``kept[].file``), for thumbnails."""
    return FileResponse(dataset_uploads.image_path(datasets.get(session, dataset_id, owner), name))
