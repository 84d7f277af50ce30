"""Merge jobs: a model with adapters merged into its weights, written by a worker (torch) as a new model."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import Job
from app.schemas import MergeRequest
from app.services import adapters, jobs, models, storage
from app.settings import get_settings


def create(
    session: Session, model_ref: str, req: MergeRequest, *, owner: str, idempotency_key: str | None
) -> tuple[Job, bool]:
    raw = {"model": model_ref, **req.model_dump(mode="json", exclude_unset=True)}
    existing = jobs.find_idempotent(session, owner, idempotency_key, jobs.request_hash(raw))
    if existing is not None:
        return existing, False
    storage.check_quota(session, owner)
    base = models.get(session, model_ref, owner)
    refs = [a.model_dump(mode="json") for a in req.adapters]
    request = {
        "model": base.id,
        "adapters": adapters.for_request(session, refs, base, owner),
        "name": req.name,
    }
    return jobs.create_job(
        session,
        kind="merge",
        owner=owner,
        idempotency_key=idempotency_key,
        raw_body=raw,
        request=request,
        queue_name=get_settings().image_queue,
        model_id=base.id,
    )
