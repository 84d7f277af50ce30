"""Dependencies routes declare by type: ``session: SessionDep`` (one DB session per request), ``owner: CallerDep``
(the caller's owner id from its API key; 401 without one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.auth import require_key
from app.db import get_session

SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[str, Depends(require_key)]
