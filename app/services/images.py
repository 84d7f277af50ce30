"""Image jobs: validate against server limits and the model, create, and render the job object."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.models import Image, Job
from app.schemas import ImageRequest
from app.services import adapters, edits, jobs, models, presenter, storage, webhooks
from app.settings import get_settings
from hdm_core.config import SAMPLER_INFO, max_seed

MEDIA = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def check_size(width: int, height: int, *, param_w: str = "width", param_h: str = "height") -> None:
    s = get_settings()
    for name, v in ((param_w, width), (param_h, height)):
        if not s.image_min_size <= v <= s.image_max_size:
            raise Invalid(f"{name} must be between {s.image_min_size} and {s.image_max_size}.", param=name)
        if v % s.image_size_multiple:
            raise Invalid(f"{name} must be a multiple of {s.image_size_multiple}.", param=name)
    if width * height > s.image_max_pixels:
        raise Invalid(f"width*height must be at most {s.image_max_pixels} pixels.", param="width")


def create(
    session: Session,
    req: ImageRequest,
    *,
    owner: str,
    idempotency_key: str | None,
    raw_body: dict[str, Any] | None = None,
    files: tuple[bytes, bytes | None] | None = None,
    masked_strength: float = edits.DEFAULT_STRENGTH,
) -> tuple[Job, bool]:
    """Sync (uploads are decoded here): call it from a worker thread. ``files``: a multipart edit's image and mask
    (else ``req.init_image`` / ``req.mask``); ``masked_strength``: the default strength with a mask."""
    check_size(req.width, req.height)
    if req.sampler not in presenter.SAMPLERS:
        raise Invalid(
            f"Unknown sampler {req.sampler!r}; choose one of {presenter.SAMPLERS}.", param="sampler"
        )
    if req.schedule is not None and req.schedule not in presenter.SCHEDULES:
        raise Invalid(
            f"Unknown schedule {req.schedule!r}; choose one of {presenter.SCHEDULES}.", param="schedule"
        )
    webhooks.check_url(req.webhook)
    decoded = edits.from_request(req, files, masked_strength=masked_strength)
    edit, pending = decoded if decoded is not None else (None, {})
    raw = raw_body if raw_body is not None else req.model_dump(mode="json", exclude_unset=True)
    if edit is not None:  # the idempotency hash sees the uploads' content ids, the job never their bytes
        raw = {**raw, "init_image": edit["init_image"], "mask": edit["mask"]}
    existing = jobs.find_idempotent(session, owner, idempotency_key, jobs.request_hash(raw))
    if existing is not None:
        return existing, False
    storage.check_quota(session, owner, adding=sum(len(b) for b in pending.values()))
    model = models.resolve(session, req.model, owner=owner)
    resolved = req.model_dump(mode="json")
    resolved["model"] = model.id
    resolved["adapters"] = adapters.for_request(session, resolved["adapters"], model, owner)
    if edit is not None:
        resolved.update(edit)
    else:
        for name in ("init_image", "strength", "mask", "mask_blur"):
            resolved.pop(name)
    if resolved["schedule"] is None:  # stored resolved: the parameters text and a rerun name what was used
        resolved["schedule"] = SAMPLER_INFO[req.sampler].default_schedule
    if resolved["seed"] is None:
        resolved["seed"] = secrets.randbelow(2**32)
    resolved["seed"] = min(resolved["seed"], max_seed(req.n))
    written: list[Path] = []
    try:
        return jobs.create_job(
            session,
            kind="image",
            owner=owner,
            idempotency_key=idempotency_key,
            raw_body=raw,
            request=resolved,
            queue_name=get_settings().image_queue,
            model_id=model.id,
            webhook=req.webhook,
            on_accept=lambda: written.extend(edits.store(pending)),
        )
    except BaseException:  # the job was not committed: the files written for it go with it
        for file in written:
            file.unlink(missing_ok=True)
        raise


def image_file(session: Session, job_id: str, index: int) -> tuple[Path, str]:
    """The file of image ``index`` of a job and its media type; 404 while it does not exist (yet)."""
    row = session.scalar(select(Image).where(Image.job_id == job_id, Image.index == index))
    if row is None or not Path(row.path).is_file():
        raise NotFound(f"Job {job_id} has no image {index} (yet).", param="index")
    return Path(row.path), MEDIA.get(row.format, "application/octet-stream")
