"""Ownership, one rule for every registered item (models, adapters, datasets), and what the registries share.

The rule: an item with no owner is shared (every key sees and uses it) and only admin keys (HDM_ADMIN_KEYS) change or
delete it; an item with an owner is seen, changed and deleted by that key (and by admin keys). A deleted item leaves
a tombstone keyed by its file's path, so the start-up scan, imports and resumed train jobs do not register it again;
its file is removed when it lies inside the service's folders. Responses to plain keys show paths relative to those
folders, never the server's absolute path.

Callers: ``find`` (id or name, visibility), ``require_change`` (the rule), ``check_removable``, ``bury`` and
``remove_file`` (deletion), ``check_not_deleted`` (registration), ``unique_name``, ``safetensors_files`` (the
models-folder walk), ``written_by_job`` (whose file the scan found), ``shown_path`` (presenter). Tables need ``id``, ``name``, ``owner`` and a file ``path``."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import ColumnElement, delete, or_, select, true
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Conflict, Forbidden
from app.models import Job, Tombstone
from app.settings import get_settings

if TYPE_CHECKING:
    from app.auth import Caller

log = logging.getLogger(__name__)
Kind = Literal["model", "adapter", "dataset"]
T = TypeVar("T")


def scope(caller: Caller) -> str | None:
    """The owner to filter by: None (everything) for admin keys, else the caller's own key."""
    return None if caller.admin else caller.owner


def visible(table: Any, owner: str | None) -> ColumnElement[bool]:
    """SQL condition: shared rows and ``owner``'s own (``owner`` None: all, for admin keys)."""
    return true() if owner is None else or_(table.owner.is_(None), table.owner == owner)


def find(session: Session, table: type[T], ref: str, owner: str | None) -> T | None:
    """The row whose id or name is ``ref`` among those ``owner`` may see (the id wins over a name)."""
    t: Any = table
    q = (
        select(t)
        .where(or_(t.id == ref, t.name == ref), visible(t, owner))
        .order_by((t.id == ref).desc(), t.id)
    )
    return session.scalar(q.limit(1))


def require_change(caller: Caller, row: Any, what: str) -> None:
    """403 unless ``caller`` may change or delete ``row`` (``what``: "Model", "Adapter", "Dataset")."""
    if caller.admin:
        return
    if row.owner is None:
        raise Forbidden(
            f"{what} {row.id} is shared: shared items (no owner) are changed and deleted by admin keys "
            "(HDM_ADMIN_KEYS) only.",
            code="admin_required",
        )
    if row.owner != caller.owner:
        raise Forbidden(
            f"{what} {row.id} belongs to another key: private items are changed and deleted by their owner "
            "(and admin keys) only.",
            code="not_owner",
        )


def unique_name(session: Session, table: Any, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... whichever no row of ``table`` has yet."""
    candidate, i = base, 1
    while session.scalar(select(table.id).where(table.name == candidate).limit(1)) is not None:
        i += 1
        candidate = f"{base}-{i}"
    return candidate


def safetensors_files(folder: Path) -> Iterator[Path]:
    """``*.safetensors`` below the models folder, sorted. Folders with a ``config.json`` (Hugging Face text
    encoders, diffusers VAEs) are not entered and symbolic links are not followed (no cycles; every file found is
    inside the folder)."""
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        if "config.json" in filenames:
            log.info("models folder: skipping %s (has config.json: a Hugging Face/diffusers folder)", dirpath)
            dirnames.clear()
            continue
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".safetensors") and not path.is_symlink():
                yield path


def written_by_job(session: Session, path: Path) -> Job | None:
    """The job that wrote ``path`` into the models folder (a train job's supervisor copies to ``train/<job>/``, a
    merge job writes ``merged/<job>.safetensors``), else None: the start-up scan registers such a file for its job's
    key, never as shared."""
    try:
        parts = path.resolve().relative_to(get_settings().models_dir.resolve()).parts
    except ValueError:
        return None
    if len(parts) == 3 and parts[0] == "train":
        job_id, kind = parts[1], "train"
    elif len(parts) == 2 and parts[0] == "merged":
        job_id, kind = Path(parts[1]).stem, "merge"
    else:
        return None
    return session.scalar(select(Job).where(Job.id == job_id, Job.kind == kind))


class Deleted(Exception):
    """The file belongs to a deleted item (tombstone); only an import with ``revive`` registers it again."""


def _key(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()


def is_deleted(session: Session, kind: Kind, path: Path) -> bool:
    q = select(Tombstone.id).where(Tombstone.kind == kind, Tombstone.path_sha256 == _key(path)).limit(1)
    return session.scalar(q) is not None


def check_not_deleted(session: Session, kind: Kind, path: Path, *, revive: bool = False) -> None:
    """Raise ``Deleted`` for a tombstoned file; with ``revive`` (an explicit import) lift the tombstone instead."""
    if not revive:
        if is_deleted(session, kind, path):
            raise Deleted(
                f"{path.name} belongs to a deleted {kind}; import it with revive to register it again"
            )
        return
    session.execute(delete(Tombstone).where(Tombstone.kind == kind, Tombstone.path_sha256 == _key(path)))


def bury(session: Session, kind: Kind, path: Path) -> None:
    """Write the tombstone of a deleted item's file (committed with the caller's delete of the row)."""
    path = path.resolve()
    session.add(Tombstone(kind=kind, path=str(path), path_sha256=_key(path), deleted_at=utcnow()))


def service_folders() -> dict[str, Path]:
    """The folders this service writes, by the name responses use for them."""
    s = get_settings()
    named = {
        "uploads": s.uploads_root,
        "outputs": s.outputs_dir,
        "models": s.models_dir,
        "runs": s.runs_dir,
        "data": s.data_root,
    }
    return {name: p.resolve() for name, p in named.items()}


def folder_of(path: Path) -> tuple[str, Path] | None:
    """(name, folder) of the service folder holding ``path``, the innermost when they nest (uploads in outputs)."""
    path = path.resolve()
    inside = [(n, f) for n, f in service_folders().items() if path.is_relative_to(f)]
    return max(inside, key=lambda nf: len(nf[1].parts)) if inside else None


def check_removable(path: Path, what: str, *, confirm_outside: bool = False) -> None:
    """409 for a file outside the service's folders unless ``confirm_outside`` (call before deleting the row)."""
    if folder_of(path) is None and not confirm_outside:
        raise Conflict(
            f"The file of {what} is outside the service's folders ({path.name}); repeat with "
            "confirm_outside=true to delete it too.",
            param="confirm_outside",
            code="confirm_required",
        )


def remove_file(path: Path) -> bool:
    """Remove a deleted item's file (or folder); returns whether anything was there."""
    path = path.resolve()
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    log.info("removed %s", path)
    return True


def shown_path(path: str, admin: bool) -> str:
    """The path a response shows: absolute to admin keys; to others relative to its service folder
    (``models/train/<job>/final.safetensors``), or the file name alone when it is in none."""
    if admin:
        return path
    p = Path(path)
    where = folder_of(p)
    if where is None:
        return p.name
    name, folder = where
    return str(Path(name) / p.resolve().relative_to(folder))
