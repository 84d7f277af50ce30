"""``POST /v1/images/parameters``: an image's A1111 parameters back as a request (app/services/png_info.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep
from app.errors import Invalid
from app.multipart import read_form
from app.services import edits, png_info

router = APIRouter(tags=["images"])


@router.post(
    "/v1/images/parameters",
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            }
        }
    },
)
async def image_parameters(request: Request, owner: CallerDep) -> Any:
    """A PNG (or WebP / JPEG) this service wrote: {"request", "parameters", "fields"}; POST `request` to /v1/images."""
    form = await read_form(request, ("file",), edits.limits())
    if "file" not in form.files:
        raise Invalid("Send the image in the form field 'file'.", param="file")
    return await run_in_threadpool(png_info.read, form.files["file"], edits.limits())
