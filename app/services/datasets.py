"""Datasets: a folder under the data root of images with same-stem .txt captions, validated by a worker job
(worker/datasets.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import keyset_page, utcnow
from app.errors import Forbidden, Invalid, NotFound
from app.ids import new_id
from app.models import Dataset, Job
from app.schemas import DatasetRequest
from app.services import jobs, webhooks
from app.settings import get_settings


def resolve_path(raw: str) -> Path:
    root = get_settings().data_root.resolve()
    candidate = Path(raw)
    try:
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        inside = path == root or root in path.parents
        is_dir = inside and path.is_dir()
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        raise Invalid("path runs into a symbolic link loop.", param="path", code="symlink_loop") from None
    except OSError as exc:  # ENAMETOOLONG (a component over 255 bytes), ELOOP, EACCES, ...
        raise Invalid(f"path cannot be used: {exc.strerror or exc}.", param="path", code="bad_path") from None
    if not inside:
        raise Forbidden(
            "path must be inside the server's data root (HDM_DATA_ROOT); give a path relative to it.",
            param="path",
            code="path_outside_data_root",
        )
    if not is_dir:
        raise Invalid(f"{raw!r} is not a folder under the data root.", param="path", code="not_a_folder")
    return path


def create(
    session: Session,
    req: DatasetRequest,
    *,
    owner: str,
    idempotency_key: str | None,
    ds_id: str | None = None,
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
        id=ds_id or new_id("ds"),
        name=req.name,
        path=str(path),
        owner=owner,
        status="validating",
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(ds)
    session.flush()
    job, created = jobs.create_job(
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
    if (
        not created
    ):  # a concurrent request with the same key won: our row was rolled back, theirs is the answer
        won = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if won is None:
            raise NotFound("The dataset of this Idempotency-Key is gone.", param="Idempotency-Key")
        return won, job
    return ds, job


def get(session: Session, ds_id: str, owner: str) -> Dataset:
    ds = session.get(Dataset, ds_id)
    if ds is None or ds.owner != owner:
        raise NotFound(f"No dataset {ds_id!r}.", param="id")
    return ds


def list_(session: Session, owner: str, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    q = select(Dataset).where(Dataset.owner == owner)
    return keyset_page(session, q, Dataset.id, limit, after)
