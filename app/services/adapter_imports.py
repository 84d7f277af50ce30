"""Adapter files made elsewhere (or here), registered through ``POST /v1/adapters`` (owned by the calling key) or
``hdm adapters import`` (shared): LyCORIS (with or without the ``model_`` wrapper prefix), kohya ``lora_unet_…`` and
peft/diffusers ``lora_A``/``lora_B`` files, as ``.safetensors`` or ``.pt``/``.ckpt``. Each is checked against the
base model's weight shapes and rewritten in this service's adapter format (hdm_core.adapters.imports, no torch);
a pickle is read by ``torch.load(weights_only=True)`` in a child process (hdm_core.adapters.pickled), so this
process never imports torch."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.errors import Invalid
from app.ids import new_id
from app.models import Adapter
from app.services import adapters, models
from app.settings import get_settings
from hdm_core.adapters.errors import AdapterError
from hdm_core.adapters.imports import Base, convert
from hdm_core.files import sha256_file

SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".ckpt")
PICKLE_TIMEOUT_S = 300
PICKLE_REFUSED = 3  # hdm_core.adapters.pickled.REFUSED (that module imports torch)


def upload_dir() -> Path:
    """Where uploaded (private) adapter files live: not under the models folder, whose start-up scan registers
    what it finds as shared."""
    return get_settings().uploads_root / "adapters"


def _base(session: Session, ref: str | None, owner: str | None) -> Base:
    ckpt = models.resolve(session, ref, owner=owner, param="base_model")
    if not ckpt.arch:
        raise Invalid(
            f"Model {ckpt.name!r} records no architecture; upload against a model written by this service.",
            param="base_model",
            code="no_architecture",
        )
    path = Path(ckpt.path)
    try:
        return Base.from_checkpoint(ckpt.name, ckpt.sha256 or sha256_file(path), ckpt.arch, path)
    except (OSError, AdapterError) as exc:
        raise Invalid(f"The file of model {ckpt.name!r} cannot be read: {exc}", param="base_model") from None


def _unpickle(src: Path, dst: Path) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hdm_core.adapters.pickled", str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=PICKLE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Invalid(f"Reading the pickle took over {PICKLE_TIMEOUT_S} s.", param="file") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        code = "adapter_refused" if done.returncode == PICKLE_REFUSED else "adapter_unreadable"
        raise Invalid(f"file: {tail}", param="file", code=code)


def import_file(
    session: Session,
    src: Path,
    filename: str,
    *,
    name: str | None,
    owner: str | None,
    base_model: str | None = None,
    dest_dir: Path | None = None,
    source: str = "upload",
) -> Adapter:
    """Convert `src` (named `filename` by its sender) and register it; Invalid (422, ``param`` file / base_model)
    names what does not fit. Nothing is left behind on failure; `src` is the caller's to delete."""
    suffix = Path(filename).suffix.lower()
    if suffix not in SAFETENSORS + PICKLES:
        raise Invalid(
            f"file must be .safetensors, .pt or .ckpt, got {filename!r}.", param="file", code="adapter_format"
        )
    base = _base(session, base_model, owner)
    folder = dest_dir or upload_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{new_id('adpf')}.safetensors"
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".import-") as tmp:
            tensors = src
            if suffix in PICKLES:
                tensors = Path(tmp) / "unpickled.safetensors"
                _unpickle(src, tensors)
            try:
                convert(tensors, dst, base)
            except AdapterError as exc:
                raise Invalid(f"file: {exc}", param="file", code="adapter_mismatch") from None
        stem = Path(filename).stem
        return adapters.register_file(session, dst, name=name or stem, owner=owner, source=source)
    except BaseException:
        session.rollback()
        dst.unlink(missing_ok=True)
        raise
