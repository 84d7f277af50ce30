"""/v1/adapters: the adapter registry; ``POST /v1/models/{id}/merge`` and /v1/merge-jobs: adapters merged into a
model as a new model (a job run by a worker)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep, KeyDep, SessionDep
from app.errors import Invalid
from app.multipart import read_form_to_disk
from app.responses import AdapterDeleted, AdapterList, AdapterOut, MergeJob
from app.routes.common import (
    After,
    ConfirmOutside,
    IdemKey,
    Limit,
    Prefer,
    job_response,
    prefer_wait,
    wait_final,
)
from app.schemas import MergeRequest
from app.services import adapter_imports, adapters, jobs, merges, presenter, registry
from app.settings import get_settings

router = APIRouter(tags=["adapters"])
Ref = Annotated[str, PathParam(max_length=300)]


@router.get("/v1/adapters", response_model=AdapterList)
def list_adapters(caller: KeyDep, session: SessionDep, limit: Limit = 100, after: After = None) -> Any:
    """Shared adapters and the caller's own; admin keys see every key's."""
    rows, more = adapters.page(session, registry.scope(caller), limit, after)
    return presenter.page([presenter.adapter(a, caller.admin) for a in rows], more)


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=AdapterOut,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string", "maxLength": 200},
                            "base_model": {"type": "string", "maxLength": 300},
                        },
                    }
                }
            }
        }
    },
)
async def upload_adapter(request: Request, owner: CallerDep, session: SessionDep) -> Any:
    """An adapter file (LyCORIS, kohya or peft names; .safetensors, .pt, .ckpt), owned by the calling key."""
    folder = adapter_imports.upload_dir()
    form = await read_form_to_disk(request, "file", folder, get_settings().adapter_upload_bytes)
    try:
        if form.path is None:
            raise Invalid("Send the adapter file in the form field 'file'.", param="file")
        name = form.fields.get("name", "").strip() or None
        if name is not None and len(name) > 200:
            raise Invalid("name is longer than 200 characters.", param="name")
        row = await run_in_threadpool(
            adapter_imports.import_file,
            session,
            form.path,
            form.filename,
            name=name,
            owner=owner,
            base_model=form.fields.get("base_model") or None,
        )
    finally:
        if form.path is not None:
            form.path.unlink(missing_ok=True)
    return JSONResponse(
        presenter.adapter(row), status_code=201, headers={"Location": f"/v1/adapters/{row.id}"}
    )


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterOut)
def get_adapter(adapter_id: Ref, caller: KeyDep, session: SessionDep) -> Any:
    return presenter.adapter(adapters.get(session, adapter_id, registry.scope(caller)), caller.admin)


@router.get(
    "/v1/adapters/{adapter_id}/file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def adapter_file(adapter_id: Ref, caller: KeyDep, session: SessionDep) -> Any:
    path = adapters.file_path(adapters.get(session, adapter_id, registry.scope(caller)))
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted)
def delete_adapter(
    adapter_id: Ref, caller: KeyDep, session: SessionDep, confirm_outside: ConfirmOutside = False
) -> Any:
    """Shared adapters: admin keys only; private ones: their owner (app/services/registry.py)."""
    row = adapters.get(session, adapter_id, registry.scope(caller))
    freed = adapters.delete(session, row, caller, confirm_outside=confirm_outside)
    return {"id": row.id, "object": "adapter", "deleted": True, "file_deleted": freed}


@router.post(
    "/v1/models/{model_id}/merge",
    status_code=202,
    response_model=MergeJob,
    responses={200: {"model": MergeJob, "description": "finished within Prefer: wait"}},
)
async def merge_model(
    model_id: Ref,
    req: MergeRequest,
    owner: CallerDep,
    session: SessionDep,
    idempotency_key: IdemKey = None,
    prefer: Prefer = None,
) -> Any:
    job, _ = await run_in_threadpool(
        merges.create, session, model_id, req, owner=owner, idempotency_key=idempotency_key
    )
    wait = prefer_wait(prefer)
    if wait:
        job = await wait_final(session, job, wait)
    return job_response(
        presenter.merge_job(job), final=job.status in jobs.FINAL, location=f"/v1/merge-jobs/{job.id}"
    )


@router.get("/v1/merge-jobs/{job_id}", response_model=MergeJob)
def get_merge_job(
    job_id: Annotated[str, PathParam(max_length=64)], owner: CallerDep, session: SessionDep
) -> Any:
    return presenter.merge_job(jobs.get_job(session, job_id, "merge", owner))
