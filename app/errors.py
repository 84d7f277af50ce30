"""Domain errors and their one mapping to HTTP: ``{"error": {"code", "message", "param"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.uploads import UploadError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, code = 400, "invalid_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class Invalid(ServiceError):
    status, code = 422, "invalid_value"


class TooMany(ServiceError):
    status, code = 429, "queue_full"


class QuotaExceeded(ServiceError):
    status, code = 507, "storage_quota_exceeded"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class GenerationFailed(ServiceError):
    status, code = 503, "generation_failed"


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def _param(loc: tuple[Any, ...] | list[Any], body: Any = None, missing: bool = False) -> str | None:
    """The field the user sent (or must send), as a dotted path. Body locations are walked through the body
    itself, so pydantic's union-member tags (``function-after[_no_nul(), str]``, ``str``, ``int``) never leak."""
    if not loc:
        return None
    where, rest = str(loc[0]), list(loc[1:])
    if where not in ("body", "query", "path", "header", "cookie"):
        rest = list(loc)
    if where != "body":
        return ".".join(str(p) for p in rest) or None
    parts: list[str] = []
    node = body
    for i, part in enumerate(rest):
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif missing and i == len(rest) - 1 and isinstance(node, dict) and isinstance(part, str):
            pass  # the required field the user left out
        else:
            break
        parts.append(str(part))
    return ".".join(parts) or None


_CODES = {"missing": "missing_field", "json_invalid": "invalid_json", "extra_forbidden": "unknown_field"}


async def _validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    etype = str(first.get("type", "value_error"))
    param = _param(first.get("loc", ()), exc.body, missing=etype == "missing")
    msg = str(first.get("msg", "invalid value"))
    if etype == "json_invalid":
        return JSONResponse(
            error_body("invalid_json", f"Request body is not valid JSON: {msg}"), status_code=400
        )
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += (
            f" (and {len(errors) - 1} more problem(s): "
            + "; ".join(
                f"{_param(e.get('loc', ()), exc.body, e.get('type') == 'missing') or 'body'}: {e.get('msg')}"
                for e in errors[1:4]
            )
            + ")"
        )
    return JSONResponse(error_body(_CODES.get(etype, "invalid_value"), message, param), status_code=422)


async def _service_handler(_request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.code, exc.message, exc.param), status_code=exc.status, headers=exc.headers
    )


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


async def _http_handler(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


DB_RETRY_AFTER_S = 5


def is_db_outage(exc: BaseException) -> bool:
    """The database cannot be reached (down, restarting, pool exhausted): a 503 to retry, not a bug."""
    if isinstance(exc, OperationalError | DisconnectionError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


async def _db_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    if not is_db_outage(exc):
        return await _unhandled(request, exc)
    log.warning("database unavailable: %s", (str(exc).splitlines() or [""])[0][:300])
    return JSONResponse(
        error_body("database_unavailable", "The database is unavailable; retry shortly."),
        status_code=503,
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )


# JSON bodies carry the image to edit as `init_image`; the multipart /v1/images/edits names its parts as OpenAI does
_JSON_UPLOAD_PARAM = {"image": "init_image", "mask": "mask"}


async def _upload_handler(request: Request, exc: UploadError) -> JSONResponse:
    multipart = request.url.path.endswith("/edits")
    param = exc.field if multipart else _JSON_UPLOAD_PARAM.get(exc.field, exc.field)
    limit = f" (limit: {exc.limit})" if exc.limit is not None and str(exc.limit) not in exc.message else ""
    message = f"{param}: {exc.message}{limit}"
    code = "too_large" if exc.status == 413 else f"invalid_image_{exc.problem}"
    return JSONResponse(error_body(code, message, param), status_code=exc.status)


async def _unhandled(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error: %s", type(exc).__name__)
    return JSONResponse(
        error_body("internal_error", "Internal server error; see the server log."), status_code=500
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _service_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _db_error)  # type: ignore[arg-type]
    app.add_exception_handler(UploadError, _upload_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)
