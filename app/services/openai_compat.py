"""The OpenAI ``images.generate`` body as an image job, and the finished job as OpenAI's response."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import as_utc
from app.errors import GenerationFailed, Invalid
from app.models import Image, Job
from app.schemas import ImageRequest, OpenAIEditRequest, OpenAIImageRequest
from app.services import images, jobs


def edit_request(fields: dict[str, str]) -> tuple[OpenAIEditRequest, ImageRequest, dict[str, Any]]:
    """The text fields of an ``images.edit`` form as the equivalent ``POST /v1/images`` request (its uploads go
    to ``images.create`` as files), and the raw body (for idempotency)."""
    body: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("init_image", "mask")}
    for name in ("camera", "tread_guidance"):  # objects arrive as JSON text in a form
        if name in body:
            try:
                body[name] = json.loads(body[name])
            except ValueError:
                raise Invalid(f"{name} must be a JSON object in a form.", param=name) from None
    try:
        req = OpenAIEditRequest(**body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_field" if first["type"] == "missing" else "invalid_value"
        raise Invalid(f"{param}: {first['msg']}", param=param, code=code) from None
    ireq, raw = image_request(req)
    return req, ireq, raw


def image_request(req: OpenAIImageRequest | OpenAIEditRequest) -> tuple[ImageRequest, dict[str, Any]]:
    """The equivalent ``POST /v1/images`` request, and the raw body (for idempotency)."""
    m = re.fullmatch(r"(\d+)x(\d+)", req.size)
    if not m:
        raise Invalid("size must look like 1024x1024.", param="size")
    width, height = int(m.group(1)), int(m.group(2))
    images.check_size(width, height, param_w="size", param_h="size")
    fields = req.model_dump(exclude={"size", "response_format"})
    raw = req.model_dump(mode="json", exclude_unset=True)
    try:
        return ImageRequest(**fields, width=width, height=height), raw
    except ValueError as exc:
        raise Invalid(str(exc), param="size") from exc


def response(session: Session, job: Job, response_format: str, base_url: str) -> dict[str, Any]:
    if job.status != "succeeded":
        err = job.error or {}
        raise GenerationFailed(
            f"Job {job.id} ended {job.status}: {err.get('message', 'timed out')}",
            code="generation_" + ("timeout" if job.status not in jobs.FINAL else job.status),
        )
    rows = list(session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index)))
    base = base_url.rstrip("/")
    data = []
    for im in rows:
        if response_format == "url":
            data.append({"url": f"{base}/v1/images/{job.id}/files/{im.index}", "revised_prompt": None})
        else:
            data.append(
                {"b64_json": base64.b64encode(Path(im.path).read_bytes()).decode(), "revised_prompt": None}
            )
    created = int(as_utc(job.created_at).timestamp())  # type: ignore[union-attr]
    return {"created": created, "data": data}
