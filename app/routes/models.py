"""/v1/models: registered checkpoints (files found at start-up, imports, train-job checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import require_key
from app.db import get_session
from app.errors import NotFound
from app.models import Checkpoint
from app.routes.common import After, Limit
from app.services import checkpoints

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelId = Annotated[str, PathParam(max_length=300)]


@router.get("")
def list_models(limit: Limit = 100, after: After = None, _owner: str = Depends(require_key),
                session: Session = Depends(get_session)) -> Any:
    q = select(Checkpoint)
    if after:
        q = q.where(Checkpoint.id < after)
    rows = list(session.scalars(q.order_by(Checkpoint.id.desc()).limit(limit + 1)))
    return {"object": "list", "data": [checkpoints.view(c) for c in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/{model_id}")
def get_model(model_id: ModelId, _owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    return checkpoints.view(checkpoints.get(session, model_id))


@router.get("/{model_id}/file", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def model_file(model_id: ModelId, _owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    ckpt = checkpoints.get(session, model_id)
    if not Path(ckpt.path).is_file():
        raise NotFound(f"The file of model {ckpt.id} is gone: {Path(ckpt.path).name}.")
    return FileResponse(ckpt.path, media_type="application/octet-stream", filename=Path(ckpt.path).name)


@router.delete("/{model_id}")
def delete_model(model_id: ModelId, _owner: str = Depends(require_key),
                 session: Session = Depends(get_session)) -> Any:
    ckpt = checkpoints.get(session, model_id)
    checkpoints.delete(session, ckpt)
    return {"id": ckpt.id, "object": "model", "deleted": True}
