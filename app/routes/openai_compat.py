"""OpenAI-compatible ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (the official ``openai``
client's ``images.generate`` and ``images.edit``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep, SessionDep
from app.errors import Invalid
from app.multipart import read_form
from app.responses import OpenAIImagesResponse
from app.routes.common import IdemKey, wait_final
from app.schemas import OpenAIImageRequest
from app.services import edits, images, openai_compat
from app.settings import get_settings

router = APIRouter(tags=["openai"])


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse)
async def generations(
    req: OpenAIImageRequest,
    request: Request,
    owner: CallerDep,
    session: SessionDep,
    idempotency_key: IdemKey = None,
) -> Any:
    ireq, raw = openai_compat.image_request(req)
    job, _ = await run_in_threadpool(
        images.create, session, ireq, owner=owner, idempotency_key=idempotency_key, raw_body=raw
    )
    job = await wait_final(session, job, float(get_settings().sync_timeout_s))
    return await run_in_threadpool(
        openai_compat.response, session, job, req.response_format, str(request.base_url)
    )


_BINARY = {"type": "string", "format": "binary"}
_EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {
                            **_BINARY,
                            "description": "PNG, JPEG or WebP; `image[]` also accepted (first).",
                        },
                        "mask": {
                            **_BINARY,
                            "description": "The image's size; transparent (or white) = repaint.",
                        },
                        "prompt": {"type": "string", "maxLength": 8000},
                        "n": {"type": "integer", "minimum": 1, "maximum": 8},
                        "size": {"type": "string", "example": "1024x1024"},
                        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                        "model": {"type": "string"},
                        "strength": {"type": "number", "minimum": 0, "maximum": 1},
                        "mask_blur": {"type": "number", "minimum": 0, "maximum": 64},
                        "steps": {"type": "integer"},
                        "seed": {"type": "integer"},
                        "guidance_scale": {"type": "number"},
                        "sampler": {"type": "string"},
                        "schedule": {"type": "string"},
                        "negative_prompt": {"type": "string"},
                        "output_format": {"type": "string", "enum": ["png", "webp", "jpeg"]},
                    },
                },
                "example": {"prompt": "a red circle", "size": "1024x1024", "response_format": "b64_json"},
            }
        },
    }
}


@router.post("/v1/images/edits", response_model=OpenAIImagesResponse, openapi_extra=_EDIT_FORM)
async def image_edits(
    request: Request, owner: CallerDep, session: SessionDep, idempotency_key: IdemKey = None
) -> Any:
    """Multipart: each file part is counted while it streams in (413 past HDM_UPLOAD_MAX_BYTES); the image is
    validated and stored before the job exists; the request waits for the result like ``generations``."""
    form = await read_form(request, ("image", "mask"), edits.limits())
    if "image" not in form.files:
        raise Invalid("image: a file part is required.", param="image", code="missing_field")
    req, ireq, raw = openai_compat.edit_request(form.fields)
    job, _ = await run_in_threadpool(
        images.create,
        session,
        ireq,
        owner=owner,
        idempotency_key=idempotency_key,
        raw_body=raw,
        files=(form.files["image"], form.files.get("mask")),
        masked_strength=1.0,
    )
    job = await wait_final(session, job, float(get_settings().sync_timeout_s))
    return await run_in_threadpool(
        openai_compat.response, session, job, req.response_format, str(request.base_url)
    )
