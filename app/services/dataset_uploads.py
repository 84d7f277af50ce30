"""``POST /v1/datasets`` as multipart: an archive of images with same-stem ``.txt`` captions becomes the calling
key's private dataset under the data root (``uploads/<dataset id>``), then validated as a registered folder is.

The archive streams into a staging folder under the data root (app/multipart.py, HDM_DATASET_UPLOAD_BYTES), is
extracted there (app/archive.py), captions get the trigger word, and only then is the folder moved into place and
registered; a refused upload removes the staging folder, so it leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.archive import IMAGE_SUFFIXES, ArchiveError, ArchiveLimits, extract
from app.errors import Conflict, Invalid, NotFound, TooLarge, Unavailable
from app.ids import new_id
from app.models import Dataset, Job
from app.schemas import DatasetRequest
from app.services import datasets
from app.settings import get_settings
from app.tagger import load as load_tagger

FIELDS = frozenset({"name", "trigger_word", "repeats", "caption", "file"})
MAX_REPEATS = 100
UPLOADS = "uploads"


def staging_dir() -> Path:
    """A fresh folder for one upload (the archive streams into it); `discard` removes it."""
    return get_settings().data_root / f".upload-{new_id('stg')}"


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _options(fields: dict[str, str]) -> tuple[str, str, int, bool]:
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise Invalid(f"Unknown form field(s) {unknown}; known: {sorted(FIELDS)}.", param=unknown[0])
    name = fields.get("name", "").strip()
    if not name or len(name) > 300:
        raise Invalid("name is required, at most 300 characters.", param="name")
    trigger = fields.get("trigger_word", "").strip()
    if len(trigger) > 100 or "\n" in trigger:
        raise Invalid("trigger_word is one line of at most 100 characters.", param="trigger_word")
    raw = fields.get("repeats", "1").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_REPEATS:
        raise Invalid(f"repeats must be an integer from 1 to {MAX_REPEATS}, got {raw!r}.", param="repeats")
    caption = fields.get("caption", "")
    if caption not in ("", "tagger"):
        raise Invalid(f"caption must be 'tagger' or absent, got {caption!r}.", param="caption")
    if caption == "tagger" and get_settings().tagger is None:
        raise Invalid(
            "caption 'tagger' needs a tagger model folder on the server (HDM_TAGGER), and none is set.",
            param="caption",
            code="no_tagger",
        )
    return name, trigger, int(raw), caption == "tagger"


def _tag(folder: Path, kept: list[dict[str, Any]]) -> None:
    """Captions from the tagger (app/tagger.py) for the images that came without one."""
    settings = get_settings()
    if settings.tagger is None:  # refused in _options already
        return
    try:
        tagger = load_tagger(settings.tagger, settings.tagger_threshold)
    except (ValueError, OSError) as exc:
        raise Unavailable(f"The server's tagger cannot be used: {exc}", param="caption") from None
    for item in kept:
        if not item["caption"]:
            with Image.open(folder / item["file"]) as image:
                item["caption"] = tagger.caption(image) or None
            item["tagged"] = True


def _captions(folder: Path, kept: list[dict[str, Any]], trigger: str) -> None:
    """The trigger word prepended to every caption that lacks it; the whole caption of an image without one."""
    for item in kept:
        caption = item["caption"] or ""
        if trigger and trigger not in [t.strip() for t in caption.split(",")]:
            caption = f"{trigger}, {caption}" if caption else trigger
        if caption:
            (folder / item["file"]).with_suffix(".txt").write_text(caption, encoding="utf-8")
        item["caption"] = caption or None


def _repeat(folder: Path, kept: list[dict[str, Any]], repeats: int) -> None:
    """Each image seen `repeats` times per epoch: hard links (no extra disk) under `<stem>_rN` names."""
    for item in kept:
        image = folder / item["file"]
        for i in range(2, repeats + 1):
            os.link(image, image.with_name(f"{image.stem}_r{i}{image.suffix}"))
            caption = image.with_suffix(".txt")
            if caption.exists():
                os.link(caption, image.with_name(f"{image.stem}_r{i}.txt"))


def create(
    session: Session, staging: Path, archive: Path | None, fields: dict[str, str], *, owner: str
) -> tuple[Dataset, Job, dict[str, Any]]:
    """Extract `archive` (inside `staging`) and register it; always removes `staging`."""
    final: Path | None = None
    try:
        name, trigger, repeats, tag = _options(fields)
        if archive is None:
            raise Invalid("Send the archive in the form field 'file' (.zip, .tar, .tar.gz).", param="file")
        files = staging / "files"
        try:
            report = extract(archive, files, ArchiveLimits())
        except ArchiveError as exc:
            error = TooLarge if exc.status == 413 else Invalid
            raise error(f"file: {exc.message}.", param="file", code=f"archive_{exc.problem}") from None
        if tag:
            _tag(files, report.kept)
        _captions(files, report.kept, trigger)
        _repeat(files, report.kept, repeats)
        ds_id = new_id("ds")
        final = get_settings().data_root / UPLOADS / ds_id
        final.parent.mkdir(parents=True, exist_ok=True)
        files.rename(final)
        req = DatasetRequest(name=name, path=str(final))
        ds, job = datasets.create(session, req, owner=owner, idempotency_key=None, ds_id=ds_id)
        upload = {**report.to_dict(), "trigger_word": trigger or None, "repeats": repeats}
        return ds, job, upload
    except BaseException:
        session.rollback()
        if final is not None:
            discard(final)
        raise
    finally:
        discard(staging)


def delete(session: Session, ds: Dataset) -> None:
    """Unregister; an uploaded dataset's folder is removed (a registered server folder is not). 409 while a queued
    or running train job uses it."""
    busy = session.scalar(
        select(Job.id).where(
            Job.dataset_id == ds.id, Job.kind == "train", Job.status.in_(("queued", "running"))
        )
    )
    if busy:
        raise Conflict(
            f"Dataset {ds.id} is used by train job {busy}; cancel it or wait.", code="dataset_in_use"
        )
    uploads = (get_settings().data_root / UPLOADS).resolve()
    path = Path(ds.path).resolve()
    session.delete(ds)
    session.commit()
    if path.parent == uploads:
        discard(path)


def image_path(ds: Dataset, name: str) -> Path:
    """One image of a dataset by its file name (no folders: the report's names), for the console's thumbnails."""
    folder = Path(ds.path)
    path = folder / name
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise NotFound(f"No image {name!r} in dataset {ds.id}.", param="file")
    if not path.is_file() or path.is_symlink():
        raise NotFound(f"No image {name!r} in dataset {ds.id}.", param="file")
    return path
