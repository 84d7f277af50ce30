"""The model registry behind /v1/models: checkpoint files found under the models folder, imported with
``hdm models import`` or written by train jobs.

Shared models (models folder, imports; owner NULL) are seen by every key; a train job's checkpoints belong to its
key. The default model is explicit: HDM_DEFAULT_MODEL, else the one marked default (by an admin key, or the first
model the start-up scan found); a newly registered checkpoint never becomes it. Deleting a model deletes its file
and leaves a tombstone, so the scan (or a resumed run) does not register it again.

Reads the safetensors header directly (JSON), so the API process does not need torch."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.auth import Caller
from app.db import keyset_page, utcnow
from app.errors import Conflict, Forbidden, Invalid, NotFound
from app.ids import new_id
from app.models import Checkpoint, Job
from app.services import registry
from app.settings import get_settings
from hdm_core.files import sha256_file

log = logging.getLogger(__name__)


def read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError("safetensors header too large")
        return json.loads(f.read(n))


def describe(path: Path) -> dict[str, Any]:
    header = read_header(path)
    meta = header.pop("__metadata__", {}) or {}
    arch: dict[str, Any] | None = None
    for key in ("hdm_config", "arch"):
        if key in meta:
            try:
                arch = json.loads(meta[key])
            except ValueError:
                arch = None
            break
    names = list(header)
    unet = [k for k in names if k.startswith("unet.")]
    counted = unet or [k for k in names if not k.startswith(("vae.", "vae_"))]
    params = sum(math.prod(header[k]["shape"]) for k in counted)
    codec = meta.get("hdm_codec") or ("vae" if any(k.startswith("vae.") for k in names) else None)
    return {"arch": arch, "params": params, "codec": codec}


def register_file(
    session: Session,
    path: Path,
    *,
    name: str | None = None,
    source: str = "file",
    train_job_id: str | None = None,
    step: int | None = None,
    revive: bool = False,
    owner: str | None = None,
) -> Checkpoint:
    """Register a checkpoint file (idempotent by path); ``registry.Deleted`` for a deleted model's file unless
    ``revive`` (an explicit import). ``owner``: the key that may see it (None: shared); a train job's checkpoints
    belong to the job's key."""
    path = path.resolve()
    existing = session.scalar(select(Checkpoint).where(Checkpoint.path == str(path)))
    if existing is not None:
        return existing
    registry.check_not_deleted(session, "model", path, revive=revive)
    if train_job_id:
        owner = session.scalar(select(Job.owner).where(Job.id == train_job_id))
    info = describe(path)
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        name=registry.unique_name(session, Checkpoint, name or path.stem),
        arch=info["arch"],
        codec=info["codec"],
        params=info["params"],
        source=source,
        train_job_id=train_job_id,
        step=step,
        sha256=sha256_file(path),
        path=str(path),
        size_bytes=path.stat().st_size,
        created_at=utcnow(),
        owner=owner,
    )
    session.add(ckpt)
    session.commit()
    log.info("registered model %s (%s) from %s", ckpt.id, ckpt.name, path)
    return ckpt


XUT_KEYS = tuple(f"{prefix}in_patch.proj.weight" for prefix in ("unet.model.", "model.", ""))


def is_xut_checkpoint(path: Path) -> bool:
    """Cheap: the safetensors header (no tensors) names an XUT input patch embedding, as hdm_core's loader needs."""
    try:
        header = read_header(path)
    except (OSError, ValueError, struct.error):
        return False
    return any(key in header for key in XUT_KEYS)


def import_file(session: Session, raw: str, *, name: str | None = None, revive: bool = False) -> Checkpoint:
    """``POST /v1/models/import`` (admin): as ``hdm models import``, but only for an XUT checkpoint inside the
    models folder (after resolving symbolic links), so a key cannot make the server read any other file."""
    root = get_settings().models_dir.resolve()
    candidate = Path(raw)
    try:
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        inside = path.is_relative_to(root)
        is_file = inside and path.is_file()
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        raise Invalid("path runs into a symbolic link loop.", param="path", code="symlink_loop") from None
    except OSError as exc:
        raise Invalid(f"path cannot be used: {exc.strerror or exc}.", param="path", code="bad_path") from None
    if not inside:
        raise Forbidden(
            f"path must be inside the models folder ({root}).", param="path", code="path_outside_models_dir"
        )
    if not is_file:
        raise Invalid(f"{raw!r} is not a file under the models folder.", param="path", code="not_a_file")
    if path.suffix != ".safetensors" or not is_xut_checkpoint(path):
        raise Invalid(
            f"{raw!r} is not an XUT checkpoint (a .safetensors file with an in_patch weight).",
            param="path",
            code="not_a_checkpoint",
        )
    try:
        return register_file(session, path, name=name, revive=revive)
    except registry.Deleted:
        raise Conflict(
            f"{raw!r} is the file of a deleted model; send revive=true to register it again.",
            param="revive",
            code="deleted_item",
        ) from None


def scan_models_dir(session: Session) -> int:
    """Register the XUT checkpoints below the models folder (``registry.safetensors_files``: no Hugging Face
    folders, no symbolic links); other ``*.safetensors`` and deleted models' files are skipped. If nothing is the
    default yet, the first model found becomes it."""
    n = 0
    for path in registry.safetensors_files(get_settings().models_dir):
        if not is_xut_checkpoint(path):
            log.info("models folder: skipping %s (not an XUT checkpoint)", path)
            continue
        job = registry.written_by_job(session, path)
        try:  # a file a job wrote but did not get to register belongs to the job's key
            if job is not None and job.kind == "merge":
                register_file(session, path, source="merge", owner=job.owner)
            elif job is not None:
                name = f"{job.id}-{path.stem}"
                register_file(session, path, name=name, source="train_job", train_job_id=job.id)
            else:
                register_file(session, path)
            n += 1
        except registry.Deleted:
            log.info("models folder: skipping %s (its model was deleted)", path)
        except Exception as exc:  # one unreadable file must not stop start-up
            session.rollback()
            log.warning("skipping %s: %s", path, exc)
    _ensure_default(session)
    return n


def _ensure_default(session: Session) -> None:
    if get_settings().default_model or session.scalar(select(Checkpoint.id).where(Checkpoint.is_default)):
        return
    first = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.owner.is_(None), Checkpoint.train_job_id.is_(None))
        .order_by(Checkpoint.created_at, Checkpoint.id)
        .limit(1)
    )
    if first is not None:
        first.is_default = True
        session.commit()
        log.info("default model: %s (%s); change it with POST /v1/models/{id}/default", first.id, first.name)


def default_model(session: Session) -> Checkpoint | None:
    ref = get_settings().default_model
    if ref:
        return session.scalar(select(Checkpoint).where(or_(Checkpoint.id == ref, Checkpoint.name == ref)))
    return session.scalar(select(Checkpoint).where(Checkpoint.is_default).limit(1))


def resolve(session: Session, ref: str | None, *, owner: str | None, param: str = "model") -> Checkpoint:
    if ref:
        ckpt = registry.find(session, Checkpoint, ref, owner)
        if ckpt is None:
            raise Invalid(f"Unknown model {ref!r}; see GET /v1/models.", param=param, code="unknown_model")
        return ckpt
    ckpt = default_model(session)
    if ckpt is None:
        setting = get_settings().default_model
        raise Invalid(
            f"HDM_DEFAULT_MODEL {setting!r} is not a registered model."
            if setting
            else "No default model: name one in 'model', set HDM_DEFAULT_MODEL, or mark one with "
            "POST /v1/models/{id}/default (admin key).",
            param=param,
            code="no_model",
        )
    return ckpt


def get(session: Session, model_id: str, owner: str | None) -> Checkpoint:
    ckpt = registry.find(session, Checkpoint, model_id, owner)
    if ckpt is None:
        raise NotFound(f"No model {model_id!r}.", param="id")
    return ckpt


def page(session: Session, owner: str | None, limit: int, after: str | None) -> tuple[list[Checkpoint], bool]:
    q = select(Checkpoint).where(registry.visible(Checkpoint, owner))
    return keyset_page(session, q, Checkpoint.id, limit, after)


def set_default(session: Session, ckpt: Checkpoint) -> Checkpoint:
    """Admin: this model answers requests without ``model``; it becomes shared (every key can use the default)."""
    if get_settings().default_model:
        raise Conflict(
            "HDM_DEFAULT_MODEL pins the default model; change the setting instead.", code="default_pinned"
        )
    session.execute(
        update(Checkpoint).where(Checkpoint.is_default, Checkpoint.id != ckpt.id).values(is_default=False)
    )
    ckpt.is_default, ckpt.owner = True, None
    session.commit()
    return ckpt


def delete(session: Session, ckpt: Checkpoint, caller: Caller, *, confirm_outside: bool = False) -> bool:
    """Deletes the row (leaving a tombstone) and the file (``registry``'s rule: inside the service's folders, or
    with ``confirm_outside``); returns whether a file was removed."""
    registry.require_change(caller, ckpt, "Model")
    busy = session.scalar(
        select(Job.id).where(Job.model_id == ckpt.id, Job.status.in_(("queued", "running"))).limit(1)
    )
    if busy:
        raise Conflict(f"Model {ckpt.id} is used by job {busy}; cancel it or wait.", code="model_in_use")
    default = default_model(session)
    if default is not None and default.id == ckpt.id:
        raise Conflict(
            f"Model {ckpt.id} is the default model; make another one the default first.",
            code="model_is_default",
        )
    path = Path(ckpt.path)
    registry.check_removable(path, f"model {ckpt.id}", confirm_outside=confirm_outside)
    registry.bury(session, "model", path)
    session.delete(ckpt)
    session.commit()
    log.info("deleted model %s", ckpt.id)
    return registry.remove_file(path)


def file_path(ckpt: Checkpoint) -> Path:
    """The model's weights file; 404 when it was removed from disk behind the registry's back."""
    path = Path(ckpt.path)
    if not path.is_file():
        raise NotFound(f"The file of model {ckpt.id} is gone: {path.name}.")
    return path
