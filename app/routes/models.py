"""/v1/models: registered checkpoints (files found at start-up, imports, train-job checkpoints), scoped per key:
shared models and the caller's own fine-tunes; admin keys see and manage all."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.auth import Caller, require_admin, require_caller
from app.db import get_session
from app.errors import NotFound
from app.routes.common import After, Limit
from app.services import checkpoints

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelId = Annotated[str, PathParam(max_length=300)]


def _scope(caller: Caller) -> str | None:
    return None if caller.admin else caller.owner


def _default_id(session: Session) -> str | None:
    default = checkpoints.default_model(session)
    return default.id if default else None


@router.get("")
def list_models(limit: Limit = 100, after: After = None, caller: Caller = Depends(require_caller),
                session: Session = Depends(get_session)) -> Any:
    rows, more = checkpoints.list_(session, _scope(caller), limit, after)
    default = _default_id(session)
    return {"object": "list", "data": [checkpoints.view(c, default) for c in rows], "has_more": more,
            "default_model": default}


@router.get("/{model_id}")
def get_model(model_id: ModelId, caller: Caller = Depends(require_caller),
              session: Session = Depends(get_session)) -> Any:
    return checkpoints.view(checkpoints.get(session, model_id, _scope(caller)), _default_id(session))


@router.get("/{model_id}/file", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def model_file(model_id: ModelId, caller: Caller = Depends(require_caller),
               session: Session = Depends(get_session)) -> Any:
    ckpt = checkpoints.get(session, model_id, _scope(caller))
    if not Path(ckpt.path).is_file():
        raise NotFound(f"The file of model {ckpt.id} is gone: {Path(ckpt.path).name}.")
    return FileResponse(ckpt.path, media_type="application/octet-stream", filename=Path(ckpt.path).name)


@router.post("/{model_id}/default")
def make_default(model_id: ModelId, caller: Caller = Depends(require_admin),
                 session: Session = Depends(get_session)) -> Any:
    """Admin key: requests without ``model`` use this model from now on (it becomes shared)."""
    ckpt = checkpoints.set_default(session, checkpoints.get(session, model_id, _scope(caller)))
    return checkpoints.view(ckpt, ckpt.id)


@router.delete("/{model_id}")
def delete_model(model_id: ModelId, confirm_outside: Annotated[bool, Query(description=(
                     "Also delete a file outside the service's own folders (models, runs, outputs)."))] = False,
                 caller: Caller = Depends(require_caller), session: Session = Depends(get_session)) -> Any:
    ckpt = checkpoints.get(session, model_id, _scope(caller))
    freed = checkpoints.delete(session, ckpt, admin=caller.admin, confirm_outside=confirm_outside)
    return {"id": ckpt.id, "object": "model", "deleted": True, "file_deleted": freed}
