"""/v1/models: the model registry (files found at start-up, imports, train-job checkpoints)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from app.deps import CallerDep, SessionDep
from app.responses import Model, ModelDeleted, ModelList
from app.routes.common import After, Limit
from app.services import models, presenter

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelId = Annotated[str, PathParam(max_length=300)]


@router.get("", response_model=ModelList)
def list_models(_owner: CallerDep, session: SessionDep, limit: Limit = 100, after: After = None) -> Any:
    rows, more = models.page(session, limit, after)
    return presenter.page([presenter.model(c) for c in rows], more)


@router.get("/{model_id}", response_model=Model)
def get_model(model_id: ModelId, _owner: CallerDep, session: SessionDep) -> Any:
    return presenter.model(models.get(session, model_id))


@router.get(
    "/{model_id}/file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def model_file(model_id: ModelId, _owner: CallerDep, session: SessionDep) -> Any:
    path = models.file_path(models.get(session, model_id))
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_model(model_id: ModelId, _owner: CallerDep, session: SessionDep) -> Any:
    ckpt = models.get(session, model_id)
    models.delete(session, ckpt)
    return {"id": ckpt.id, "object": "model", "deleted": True}
