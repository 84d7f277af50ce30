"""The model registry behind /v1/models: checkpoint files found under the models folder, imported with
``hdm models import`` or written by train jobs.

Reads the safetensors header directly (JSON), so the API process does not need torch."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Conflict, Invalid, NotFound
from app.ids import new_id
from app.models import Checkpoint, Job
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
) -> Checkpoint:
    path = path.resolve()
    existing = session.scalar(select(Checkpoint).where(Checkpoint.path == str(path)))
    if existing is not None:
        return existing
    info = describe(path)
    base = name or path.stem
    candidate, i = base, 1
    while session.scalar(select(Checkpoint.id).where(Checkpoint.name == candidate)) is not None:
        i += 1
        candidate = f"{base}-{i}"
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        name=candidate,
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


def scan_models_dir(session: Session) -> int:
    """Register the XUT checkpoints below the models folder. Folders with a ``config.json`` (Hugging Face text
    encoders, diffusers VAEs) are not entered; other ``*.safetensors`` that are not XUT checkpoints are skipped."""
    folder = get_settings().models_dir
    if not folder.is_dir():
        return 0
    n = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        if "config.json" in filenames:
            log.info("models folder: skipping %s (has config.json: a Hugging Face/diffusers folder)", dirpath)
            dirnames.clear()
            continue
        for name in sorted(filenames):
            if not name.endswith(".safetensors"):
                continue
            path = Path(dirpath) / name
            if not is_xut_checkpoint(path):
                log.info("models folder: skipping %s (not an XUT checkpoint)", path)
                continue
            try:
                register_file(session, path)
                n += 1
            except Exception as exc:  # one unreadable file must not stop start-up
                session.rollback()
                log.warning("skipping %s: %s", path, exc)
    return n


def resolve(session: Session, ref: str | None, *, param: str = "model") -> Checkpoint:
    settings = get_settings()
    ref = ref or settings.default_model
    if ref:
        ckpt = session.scalar(select(Checkpoint).where(or_(Checkpoint.id == ref, Checkpoint.name == ref)))
        if ckpt is None:
            raise Invalid(f"Unknown model {ref!r}; see GET /v1/models.", param=param, code="unknown_model")
        return ckpt
    ckpt = session.scalar(select(Checkpoint).order_by(Checkpoint.id.desc()).limit(1))
    if ckpt is None:
        raise Invalid(
            "No model is registered; put a .safetensors file in the models folder or run "
            "'hdm models import'.",
            param=param,
            code="no_model",
        )
    return ckpt


def get(session: Session, model_id: str) -> Checkpoint:
    ckpt = session.scalar(
        select(Checkpoint).where(or_(Checkpoint.id == model_id, Checkpoint.name == model_id))
    )
    if ckpt is None:
        raise NotFound(f"No model {model_id!r}.", param="id")
    return ckpt


def delete(session: Session, ckpt: Checkpoint) -> None:
    busy = session.scalar(
        select(Job.id).where(Job.model_id == ckpt.id, Job.status.in_(("queued", "running"))).limit(1)
    )
    if busy:
        raise Conflict(f"Model {ckpt.id} is used by job {busy}; cancel it or wait.", code="model_in_use")
    session.delete(ckpt)
    session.commit()


def page(session: Session, limit: int, after: str | None) -> tuple[list[Checkpoint], bool]:
    q = select(Checkpoint)
    if after:
        q = q.where(Checkpoint.id < after)
    rows = list(session.scalars(q.order_by(Checkpoint.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def file_path(ckpt: Checkpoint) -> Path:
    """The model's weights file; 404 when it was removed from disk behind the registry's back."""
    path = Path(ckpt.path)
    if not path.is_file():
        raise NotFound(f"The file of model {ckpt.id} is gone: {path.name}.")
    return path
