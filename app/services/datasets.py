"""Datasets: a folder under the data root of images with same-stem .txt captions, validated by a worker job
(worker/datasets.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Forbidden, Invalid, NotFound
from app.ids import new_id
from app.models import Dataset, Job
from app.schemas import DatasetRequest
from app.services import jobs, webhooks
from app.settings import get_settings


def resolve_path(raw: str) -> Path:
    root = get_settings().data_root.resolve()
    candidate = Path(raw)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise Forbidden(
            f"path must be inside the server's data root ({root}).",
            param="path",
            code="path_outside_data_root",
        )
    if not path.is_dir():
        raise Invalid(f"{raw!r} is not a folder under the data root.", param="path", code="not_a_folder")
    return path


def create(
    session: Session, req: DatasetRequest, *, owner: str, idempotency_key: str | None
) -> tuple[Dataset, Job]:
    webhooks.check_url(req.webhook)
    raw = req.model_dump(mode="json", exclude_unset=True)
    existing = jobs.find_idempotent(session, owner, idempotency_key, jobs.request_hash(raw))
    if existing is not None and existing.dataset_id:
        ds = session.get(Dataset, existing.dataset_id)
        if ds is not None:
            return ds, existing
    path = resolve_path(req.path)
    ds = Dataset(
        id=new_id("ds"),
        name=req.name,
        path=str(path),
        owner=owner,
        status="validating",
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(ds)
    session.flush()
    job, _ = jobs.create_job(
        session,
        kind="dataset",
        owner=owner,
        idempotency_key=idempotency_key,
        raw_body=raw,
        request={"dataset": ds.id, "path": str(path)},
        queue_name=get_settings().image_queue,
        dataset_id=ds.id,
        webhook=req.webhook,
    )
    return ds, job


def get(session: Session, ds_id: str, owner: str) -> Dataset:
    ds = session.get(Dataset, ds_id)
    if ds is None or ds.owner != owner:
        raise NotFound(f"No dataset {ds_id!r}.", param="id")
    return ds


def list_(session: Session, owner: str, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    q = select(Dataset).where(Dataset.owner == owner)
    if after:
        q = q.where(Dataset.id < after)
    rows = list(session.scalars(q.order_by(Dataset.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
