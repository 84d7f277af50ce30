"""API-key auth: ``Authorization: Bearer <key>``, compared in constant time; keys never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import get_session
from app.errors import Unauthorized
from app.models import ApiKey
from app.settings import get_settings

log = logging.getLogger(__name__)
ANONYMOUS = "anonymous"


def key_owner(key: str) -> str:
    """Stable, non-reversible owner id for a key (used for per-key queues, idempotency and listing)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


DB_KEYS_TTL_S = 5.0
_cache: tuple[float, list[str]] = (-1e9, [])


def _db_keys(session: Session, max_age_s: float = DB_KEYS_TTL_S) -> list[str]:
    """SHA-256 of the active keys stored in the database, re-read every few seconds (revocation takes <= 5 s)."""
    global _cache
    now = time.monotonic()
    if now - _cache[0] > max_age_s:
        _cache = (now, list(session.scalars(select(ApiKey.key_sha256).where(ApiKey.revoked_at.is_(None)))))
    return _cache[1]


def auth_open(session: Session) -> bool:
    settings = get_settings()
    return not settings.api_key_list and not settings.require_api_keys and not _db_keys(session)


def require_key(request: Request, session: Annotated[Session, Depends(get_session)]) -> str:
    """Returns the caller's owner id; 401 when the key is missing or unknown."""
    settings = get_settings()
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    configured = settings.api_key_list
    db_keys = _db_keys(session)
    if not configured and not db_keys and not settings.require_api_keys:
        return key_owner(token) if token else ANONYMOUS
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    ok = False
    for candidate in configured:  # no early exit: time does not depend on which key matched
        ok |= hmac.compare_digest(candidate.encode(), token.encode())
    digest = hashlib.sha256(token.encode()).hexdigest()
    for stored in db_keys:
        ok |= hmac.compare_digest(stored, digest)
    if not ok:  # maybe a key created since the last read (re-read at most once a second)
        for stored in _db_keys(session, max_age_s=1.0):
            ok |= hmac.compare_digest(stored, digest)
    if not ok:
        raise Unauthorized("Invalid API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return key_owner(token)
