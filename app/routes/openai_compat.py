"""OpenAI-compatible ``POST /v1/images/generations`` (the official ``openai`` client's ``images.generate``)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import require_key
from app.db import get_session
from app.errors import Invalid, ServiceError
from app.models import Image
from app.routes.common import IdemKey, wait_final
from app.schemas import ImageRequest, OpenAIImageRequest, OpenAIImagesResponse
from app.services import images, jobs
from app.settings import get_settings

router = APIRouter(tags=["openai"])


class GenerationFailed(ServiceError):
    status, code = 503, "generation_failed"


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse)
async def generations(req: OpenAIImageRequest, request: Request, idempotency_key: IdemKey = None,
                      owner: str = Depends(require_key), session: Session = Depends(get_session)) -> Any:
    m = re.fullmatch(r"(\d+)x(\d+)", req.size)
    if not m:
        raise Invalid("size must look like 1024x1024.", param="size")
    width, height = int(m.group(1)), int(m.group(2))
    images.check_size(width, height, param_w="size", param_h="size")
    fields = req.model_dump(exclude={"size", "response_format"})
    raw = req.model_dump(mode="json", exclude_unset=True)
    try:
        ireq = ImageRequest(**fields, width=width, height=height)
    except ValueError as exc:
        raise Invalid(str(exc), param="size") from exc
    job, _ = await run_in_threadpool(images.create, session, ireq, owner=owner, idempotency_key=idempotency_key,
                                     raw_body=raw)
    job = await wait_final(session, job, float(get_settings().sync_timeout_s))
    return await run_in_threadpool(_respond, session, job, req.response_format, str(request.base_url))


def _respond(session: Session, job: Any, response_format: str, base_url: str) -> dict[str, Any]:
    if job.status != "succeeded":
        err = job.error or {}
        raise GenerationFailed(f"Job {job.id} ended {job.status}: {err.get('message', 'timed out')}",
                               code="generation_" + ("timeout" if job.status not in jobs.FINAL else job.status))
    rows = list(session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index)))
    base = base_url.rstrip("/")
    data = []
    for im in rows:
        if response_format == "url":
            data.append({"url": f"{base}/v1/images/{job.id}/files/{im.index}", "revised_prompt": None})
        else:
            data.append({"b64_json": base64.b64encode(Path(im.path).read_bytes()).decode(), "revised_prompt": None})
    created = int(jobs.as_utc(job.created_at).timestamp())  # type: ignore[union-attr]
    return {"created": created, "data": data}
