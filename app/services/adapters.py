"""The adapter registry behind /v1/adapters: LyCORIS adapter files (hdm_core.adapters.files's format) found under the
models folder, imported with ``hdm adapters import`` or written by adapter train jobs; and the check of an image
request's ``adapters`` against its model.

Reads the safetensors header (JSON), so the API process does not need torch. A file is an adapter when its metadata
says ``format = hdm-serve-adapter/1`` and every tensor has a LyCORIS key (``lycoris_<module>.<param>``); XUT
checkpoints (``app/services/models.py``) have neither."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Caller
from app.db import keyset_page, utcnow
from app.errors import Conflict, Invalid, NotFound
from app.ids import new_id
from app.models import Adapter, Checkpoint, Job
from app.services import registry
from app.services.models import read_header
from app.settings import get_settings
from hdm_core.config import XUTConfig, adapter_arch_diffs
from hdm_core.files import sha256_file

log = logging.getLogger(__name__)
FORMAT = "hdm-serve-adapter/1"  # hdm_core.adapters.files.FORMAT (that module imports torch)
MAX_PER_REQUEST = 8
WEIGHT_LIMIT = 4.0


def describe(path: Path) -> dict[str, Any]:
    """The registry's columns from the file's header; ValueError when it is not an adapter file."""
    header = read_header(path)
    meta = header.pop("__metadata__", {}) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name}: metadata format is {meta.get('format')!r}, not {FORMAT!r}")
    if not header or not all(k.startswith("lycoris_") for k in header):
        raise ValueError(f"{path.name}: not every tensor has a LyCORIS key (lycoris_<module>.<param>)")
    try:
        config = json.loads(meta["hdm_adapter_config"])
        base_arch = XUTConfig.from_dict(json.loads(meta["hdm_base_config"])).to_dict()
        words = json.loads(meta.get("hdm_trigger_words", "[]"))
        steps = int(meta.get("hdm_training_steps", "0"))
        algorithm, base_model, base_sha = (
            meta["hdm_adapter_algorithm"],
            meta["hdm_base_model"],
            meta["hdm_base_sha256"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path.name}: adapter metadata unreadable: {exc!r}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{path.name}: metadata hdm_trigger_words is not a list of strings")
    return {
        "algorithm": algorithm,
        "config": config,
        "base_model": base_model,
        "base_sha256": base_sha,
        "base_arch": base_arch,
        "trigger_words": words,
        "caption_sample": meta.get("hdm_caption_sample", ""),
        "steps": steps,
        "params": sum(math.prod(v["shape"]) for v in header.values()),
    }


def is_adapter_file(path: Path) -> bool:
    try:
        describe(path)
    except (OSError, ValueError, struct.error):
        return False
    return True


def register_file(
    session: Session,
    path: Path,
    *,
    name: str | None = None,
    owner: str | None = None,
    source: str = "file",
    train_job_id: str | None = None,
    revive: bool = False,
) -> Adapter:
    """Register (or return the registered row of) an adapter file; ValueError when it is not one,
    ``registry.Deleted`` for a deleted adapter's file unless ``revive`` (an explicit import)."""
    path = path.resolve()
    existing = session.scalar(select(Adapter).where(Adapter.path == str(path)))
    if existing is not None:
        return existing
    registry.check_not_deleted(session, "adapter", path, revive=revive)
    info = describe(path)
    row = Adapter(
        id=new_id("adp"),
        name=registry.unique_name(session, Adapter, name or path.stem),
        owner=owner,
        source=source,
        train_job_id=train_job_id,
        sha256=sha256_file(path),
        path=str(path),
        size_bytes=path.stat().st_size,
        created_at=utcnow(),
        **info,
    )
    session.add(row)
    session.commit()
    log.info("registered adapter %s (%s) from %s", row.id, row.name, path)
    return row


def scan_models_dir(session: Session) -> int:
    """Register the adapter files below the models folder (the checkpoint scan's walk,
    ``registry.safetensors_files``); deleted adapters' files are skipped."""
    n = 0
    for path in registry.safetensors_files(get_settings().models_dir):
        if not is_adapter_file(path):
            continue
        job = registry.written_by_job(session, path)  # an adapter job's file: its key's, never shared
        try:
            if job is not None:
                name = f"{job.id}-{path.stem}"
                register_file(
                    session, path, name=name, owner=job.owner, source="train_job", train_job_id=job.id
                )
            else:
                register_file(session, path)
            n += 1
        except registry.Deleted:
            log.info("models folder: skipping %s (its adapter was deleted)", path)
        except Exception as exc:  # one unreadable file must not stop start-up
            session.rollback()
            log.warning("skipping adapter %s: %s", path, exc)
    return n


def get(session: Session, ref: str, owner: str | None) -> Adapter:
    row = registry.find(session, Adapter, ref, owner)
    if row is None:
        raise NotFound(f"No adapter {ref!r}.", param="id")
    return row


def page(session: Session, owner: str | None, limit: int, after: str | None) -> tuple[list[Adapter], bool]:
    q = select(Adapter).where(registry.visible(Adapter, owner))
    return keyset_page(session, q, Adapter.id, limit, after)


def delete(session: Session, row: Adapter, caller: Caller, *, confirm_outside: bool = False) -> bool:
    """Unregister (leaving a tombstone: the scan and a resumed train job do not register it again) and remove the
    file (``registry``'s rule); returns whether a file was removed."""
    registry.require_change(caller, row, "Adapter")
    active = session.execute(
        select(Job.id, Job.request).where(Job.kind == "image", Job.status.in_(("queued", "running")))
    )
    busy = next((j for j, req in active if any(a["id"] == row.id for a in req.get("adapters") or [])), None)
    if busy:
        raise Conflict(f"Adapter {row.id} is used by job {busy}; cancel it or wait.", code="adapter_in_use")
    path = Path(row.path)
    registry.check_removable(path, f"adapter {row.id}", confirm_outside=confirm_outside)
    registry.bury(session, "adapter", path)
    session.delete(row)
    session.commit()
    log.info("deleted adapter %s", row.id)
    return registry.remove_file(path)


def file_path(row: Adapter) -> Path:
    path = Path(row.path)
    if not path.is_file():
        raise NotFound(f"The file of adapter {row.id} is gone: {path.name}.")
    return path


def for_request(
    session: Session, refs: list[dict[str, Any]], model: Checkpoint, owner: str | None
) -> list[dict[str, Any]]:
    """An image request's ``adapters`` ([{"id", "weight"}], already bounded by the schema) resolved against the
    registry and checked against the model's architecture: what the job records and the worker applies."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    arch = _arch(model)
    for i, ref in enumerate(refs):
        row = registry.find(session, Adapter, ref["id"], owner)
        if row is None:
            raise Invalid(
                f"Unknown adapter {ref['id']!r}; see GET /v1/adapters.",
                param=f"adapters.{i}.id",
                code="unknown_adapter",
            )
        if row.id in seen:
            raise Invalid(
                f"Adapter {row.id} is listed twice; give it once with the summed weight.",
                param=f"adapters.{i}.id",
            )
        seen.add(row.id)
        if arch is not None:
            diffs = adapter_arch_diffs(XUTConfig.from_dict(row.base_arch), arch)
            if diffs:
                raise Invalid(
                    f"Adapter {row.name!r} was trained for another architecture than model {model.name!r}: "
                    + "; ".join(diffs),
                    param=f"adapters.{i}.id",
                    code="adapter_arch_mismatch",
                )
        out.append({"id": row.id, "name": row.name, "weight": ref["weight"], "sha256": row.sha256})
    return out


def _arch(model: Checkpoint) -> XUTConfig | None:
    """The model's architecture when its file recorded one (otherwise the worker checks when it applies)."""
    try:
        return XUTConfig.from_dict(model.arch) if model.arch else None
    except (TypeError, ValueError):
        return None
