"""OpenAI-compatible ``POST /v1/images/generations`` (the official ``openai`` client's ``images.generate``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.deps import CallerDep, SessionDep
from app.responses import OpenAIImagesResponse
from app.routes.common import IdemKey, wait_final
from app.schemas import OpenAIImageRequest
from app.services import images, openai_compat
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
