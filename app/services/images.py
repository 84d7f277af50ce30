"""Image jobs: validate against server limits and the model, create, and render the job object."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Invalid
from app.models import Checkpoint, Image, Job
from app.schemas import MAX_SEED, ImageRequest
from app.services import checkpoints, jobs, webhooks
from app.settings import get_settings


def check_size(width: int, height: int, *, param_w: str = "width", param_h: str = "height") -> None:
    s = get_settings()
    for name, v in ((param_w, width), (param_h, height)):
        if not s.image_min_size <= v <= s.image_max_size:
            raise Invalid(f"{name} must be between {s.image_min_size} and {s.image_max_size}.", param=name)
        if v % s.image_size_multiple:
            raise Invalid(f"{name} must be a multiple of {s.image_size_multiple}.", param=name)
    if width * height > s.image_max_pixels:
        raise Invalid(f"width*height must be at most {s.image_max_pixels} pixels.", param="width")


def create(session: Session, req: ImageRequest, *, owner: str, idempotency_key: str | None,
           raw_body: dict[str, Any] | None = None) -> tuple[Job, bool]:
    check_size(req.width, req.height)
    if req.sampler not in checkpoints.SAMPLERS:
        raise Invalid(f"Unknown sampler {req.sampler!r}; choose one of {checkpoints.SAMPLERS}.", param="sampler")
    webhooks.check_url(req.webhook)
    raw = raw_body if raw_body is not None else req.model_dump(mode="json", exclude_unset=True)
    existing = jobs.find_idempotent(session, owner, idempotency_key, jobs.request_hash(raw))
    if existing is not None:
        return existing, False
    model = checkpoints.resolve(session, req.model, owner=owner)
    resolved = req.model_dump(mode="json")
    resolved["model"] = model.id
    if resolved["seed"] is None:
        resolved["seed"] = secrets.randbelow(2**32)
    resolved["seed"] = min(resolved["seed"], MAX_SEED - req.n + 1)
    return jobs.create_job(session, kind="image", owner=owner, idempotency_key=idempotency_key, raw_body=raw,
                           request=resolved, queue_name=get_settings().image_queue, model_id=model.id,
                           webhook=req.webhook)


def view(session: Session, job: Job, base_url: str = "") -> dict[str, Any]:
    images = list(session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index)))
    model = session.get(Checkpoint, job.model_id) if job.model_id else None
    result = job.result or {}
    timings = dict(result.get("timings") or {})
    started, created = job.started_at, job.created_at
    if started is not None and created is not None:
        timings.setdefault("queued_s", round((jobs.as_utc(started) - jobs.as_utc(created)).total_seconds(), 4))
    for k in ("queued_s", "load_s", "sample_s", "decode_s"):
        timings.setdefault(k, None)
    base = base_url.rstrip("/")
    return {
        "id": job.id, "object": "image_job", "status": job.status, "created_at": jobs.iso(job.created_at),
        "started_at": jobs.iso(job.started_at), "finished_at": jobs.iso(job.finished_at),
        "queue_position": jobs.queue_position(session, job),
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "request": job.request,
        "model": {"id": job.model_id, "name": model.name if model else None},
        "images": [{"index": im.index, "seed": im.seed, "width": im.width, "height": im.height,
                    "url": f"{base}/v1/images/{job.id}/files/{im.index}"} for im in images],
        "error": job.error, "timings": timings, "attempts": job.attempts,
        "model_cache_hit": result.get("cache_hit"),
    }


def image_row(session: Session, job_id: str, index: int) -> Image | None:
    return session.scalar(select(Image).where(Image.job_id == job_id, Image.index == index))
