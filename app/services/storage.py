"""Disk: what each service folder holds, the per-key storage quota, the retention policy and the removal of an image
job's files.

Retention (maintenance loop, ``expire``): outputs of image jobs finished more than ``HDM_OUTPUTS_TTL_DAYS`` ago and
uploads (init images, masks) unused for ``HDM_UPLOADS_TTL_HOURS`` are removed; 0 keeps them. An upload a queued or
running job needs is never removed. Quota (``check_quota``): with ``HDM_KEY_STORAGE_BYTES`` set, a request that would
store more for a key already at its quota is refused (507) before anything is written."""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Conflict, QuotaExceeded
from app.models import Adapter, Checkpoint, Image, Job, JobEvent, WebhookDelivery
from app.services import edits, jobs, registry
from app.settings import get_settings

log = logging.getLogger(__name__)
EXPIRE_BATCH = 200  # image jobs per maintenance tick, so one tick stays short after a long downtime


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def folder_usage() -> dict[str, dict[str, int]]:
    """Bytes and files below each service folder, each file counted in its innermost folder (the uploads folder
    inside outputs is not counted twice), and the free bytes of the disk holding it."""
    folders = registry.service_folders()
    nested = set(folders.values())
    out: dict[str, dict[str, int]] = {}
    for name, root in folders.items():
        size = files = 0
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() not in nested]
            for f in filenames:
                size += _size(Path(dirpath, f))
                files += 1
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        out[name] = {"bytes": size, "files": files, "free_bytes": free}
    return out


def _upload_refs(session: Session, *conds: Any) -> set[str]:
    rows = session.execute(
        select(Job.request["init_image"].as_string(), Job.request["mask"].as_string()).where(
            Job.kind == "image", *conds
        )
    )
    return {ref for row in rows for ref in row if ref}


def key_usage(session: Session, owner: str) -> int:
    """Bytes stored for a key: its image jobs' outputs and uploads, and the models and adapters it owns."""
    outputs = session.scalars(select(Image.path).join(Job, Job.id == Image.job_id).where(Job.owner == owner))
    total = sum(_size(Path(p)) for p in outputs)
    total += sum(_size(edits.path(u)) for u in _upload_refs(session, Job.owner == owner))
    for table in (Checkpoint, Adapter):
        total += int(session.scalar(select(func.sum(table.size_bytes)).where(table.owner == owner)) or 0)
    return total


def check_quota(session: Session, owner: str, adding: int = 0) -> None:
    """507 when the key already stores ``HDM_KEY_STORAGE_BYTES`` or ``adding`` more bytes would pass it."""
    limit = get_settings().key_storage_bytes
    if not limit:
        return
    used = key_usage(session, owner)
    if used + adding > limit or used >= limit:
        raise QuotaExceeded(
            f"Storage quota exceeded: this key stores {used} bytes (image outputs, uploads, its models and "
            f"adapters){f' and this request adds {adding}' if adding else ''}; HDM_KEY_STORAGE_BYTES allows "
            f"{limit}. Free space with DELETE /v1/images/{{id}}, /v1/models/{{id}} or /v1/adapters/{{id}}.",
            code="storage_quota_exceeded",
        )


def _remove_unused_uploads(session: Session, refs: set[str]) -> int:
    needed = _upload_refs(session, Job.status.in_(("queued", "running")))
    return sum(registry.remove_file(edits.path(u)) for u in refs - needed)


def delete_image_job(session: Session, job: Job) -> int:
    """``DELETE /v1/images/{id}``: a finished job, its output files, the uploads no unfinished job needs, its rows.
    Returns how many files and folders were removed."""
    if job.status not in jobs.FINAL:
        raise Conflict(f"Job {job.id} is {job.status}; cancel it first.", code="job_active")
    refs = {r for r in (job.request.get("init_image"), job.request.get("mask")) if r}
    for table in (Image, JobEvent, WebhookDelivery):
        session.execute(delete(table).where(table.job_id == job.id))
    session.delete(job)
    session.commit()
    removed = int(registry.remove_file(get_settings().outputs_dir / job.id))
    return removed + _remove_unused_uploads(session, refs)


def expire(session: Session) -> int:
    """The retention policy, one maintenance step; returns how many files and folders it removed."""
    s = get_settings()
    removed = 0
    if s.outputs_ttl_days:
        cutoff = utcnow() - timedelta(days=s.outputs_ttl_days)
        has_images = select(Image.id).where(Image.job_id == Job.id).exists()
        ids = list(
            session.scalars(
                select(Job.id)
                .where(Job.kind == "image", Job.finished_at < cutoff, has_images)
                .limit(EXPIRE_BATCH)
            )
        )
        for job_id in ids:
            session.execute(delete(Image).where(Image.job_id == job_id))
            jobs.add_event(session, job_id, "log", {"message": "outputs removed (HDM_OUTPUTS_TTL_DAYS)"})
            session.commit()
            removed += registry.remove_file(s.outputs_dir / job_id)
    if s.uploads_ttl_hours and s.uploads_root.is_dir():
        cutoff_s = time.time() - s.uploads_ttl_hours * 3600
        old = {
            f.stem
            for f in s.uploads_root.iterdir()
            if edits.UPLOAD_ID.fullmatch(f.stem) and f.suffix == ".png" and f.stat().st_mtime < cutoff_s
        }
        removed += _remove_unused_uploads(session, old)
    if removed:
        log.info("retention: removed %d expired file(s)/folder(s)", removed)
    return removed
