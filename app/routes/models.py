"""/v1/models: the model registry (files found at start-up, imports, train-job checkpoints), scoped per key:
shared models and the caller's own fine-tunes; admin keys see and manage all."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.deps import AdminDep, KeyDep, SessionDep
from app.responses import Model, ModelDeleted, ModelList
from app.routes.common import After, ConfirmOutside, Limit
from app.schemas import ModelImportRequest
from app.services import models, presenter, registry

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelId = Annotated[str, PathParam(max_length=300)]


def _default_id(session: Session) -> str | None:
    default = models.default_model(session)
    return default.id if default else None


@router.get("", response_model=ModelList)
def list_models(caller: KeyDep, session: SessionDep, limit: Limit = 100, after: After = None) -> Any:
    rows, more = models.page(session, registry.scope(caller), limit, after)
    default = _default_id(session)
    return {
        **presenter.page([presenter.model(c, default, caller.admin) for c in rows], more),
        "default_model": default,
    }


@router.post("/import", response_model=Model)
def import_model(req: ModelImportRequest, caller: AdminDep, session: SessionDep) -> Any:
    """Admin key: register a checkpoint file under the models folder, shared (``hdm models import`` over HTTP)."""
    ckpt = models.import_file(session, req.path, name=req.name, revive=req.revive)
    return presenter.model(ckpt, _default_id(session), caller.admin)


@router.get("/{model_id}", response_model=Model)
def get_model(model_id: ModelId, caller: KeyDep, session: SessionDep) -> Any:
    ckpt = models.get(session, model_id, registry.scope(caller))
    return presenter.model(ckpt, _default_id(session), caller.admin)


@router.get(
    "/{model_id}/file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def model_file(model_id: ModelId, caller: KeyDep, session: SessionDep) -> Any:
    path = models.file_path(models.get(session, model_id, registry.scope(caller)))
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.post("/{model_id}/default", response_model=Model)
def make_default(model_id: ModelId, caller: AdminDep, session: SessionDep) -> Any:
    """Admin key: requests without ``model`` use this model from now on (it becomes shared)."""
    ckpt = models.set_default(session, models.get(session, model_id, registry.scope(caller)))
    return presenter.model(ckpt, ckpt.id, caller.admin)


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_model(
    model_id: ModelId, caller: KeyDep, session: SessionDep, confirm_outside: ConfirmOutside = False
) -> Any:
    ckpt = models.get(session, model_id, registry.scope(caller))
    freed = models.delete(session, ckpt, caller, confirm_outside=confirm_outside)
    return {"id": ckpt.id, "object": "model", "deleted": True, "file_deleted": freed}
