"""Init images and masks of edit requests (issue 13).

The API process validates an upload (app/uploads.py: byte limit, format, pixel limit from the header, full decode)
before any job exists and re-encodes it as a PNG of its own, named by its content hash; the job stores only that id.
The file is written under ``HDM_UPLOADS_DIR`` (default ``HDM_OUTPUTS_DIR/uploads``) only once the job is accepted
(``store``, called by jobs.create_job after every check), so a refused request (422, 429, 507) leaves nothing. The
worker opens the file by id (``path``); no image bytes go through the broker or the jobs table.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from app.errors import Invalid
from app.schemas import ImageParams
from app.settings import get_settings
from app.uploads import EditImages, UploadLimits, decode_base64, read_edit_images, to_png

UPLOAD_ID = re.compile(r"upl_[0-9a-f]{32}")
DEFAULT_STRENGTH = 0.8


def limits() -> UploadLimits:
    s = get_settings()
    return UploadLimits(max_bytes=s.upload_max_bytes, max_pixels=s.upload_max_pixels)


def path(upload_id: str) -> Path:
    if not UPLOAD_ID.fullmatch(upload_id):
        raise ValueError(f"not an upload id: {upload_id!r}")
    return get_settings().uploads_root / f"{upload_id}.png"


Pending = dict[str, bytes]  # upload id -> the PNG to write once the job is accepted


def _encode(image: Image.Image, pending: Pending) -> str:
    data = to_png(image)
    upload_id = "upl_" + hashlib.sha256(data).hexdigest()[:32]
    pending[upload_id] = data
    return upload_id


def store(pending: Pending) -> list[Path]:
    """Write the uploads of an accepted job; returns the files written here (the caller removes them if the job's
    commit fails). Same content, same id: an existing file is only touched, so retention counts from its last use."""
    written = []
    for upload_id, data in pending.items():
        file = path(upload_id)
        if file.is_file():
            os.utime(file)
            continue
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, file)
        written.append(file)
    return written


def job_fields(
    images: EditImages, strength: float | None, mask_blur: float, default_strength: float, pending: Pending
) -> dict[str, Any]:
    """What the job stores: upload ids, never bytes (those go to ``pending``)."""
    has_mask = images.mask is not None
    return {
        "init_image": _encode(images.image, pending),
        "mask": _encode(images.mask, pending) if images.mask is not None else None,
        "mask_from_alpha": images.mask_from_alpha,
        "strength": default_strength if strength is None else strength,
        "mask_blur": mask_blur if has_mask else 0.0,
        "init_size": f"{images.image.width}x{images.image.height}",
    }


def from_request(
    req: ImageParams,
    files: tuple[bytes, bytes | None] | None = None,
    *,
    masked_strength: float = DEFAULT_STRENGTH,
) -> tuple[dict[str, Any], Pending] | None:
    """The request's edit fields as the job stores them and the files to ``store`` once it is accepted, or None for
    text-to-image. Decodes images: call it from a worker thread. ``files``: the image and mask of a multipart upload (else the base64 fields of ``req``);
    ``masked_strength``: the default strength when there is a mask (OpenAI's edits repaint the masked area fully)."""
    if files is None:
        if req.init_image is None:
            for name in ("strength", "mask"):
                if getattr(req, name) is not None:
                    raise Invalid(f"{name} needs an init_image.", param=name)
            return None
        lim = limits()
        image = decode_base64(req.init_image, "image", lim)
        mask = None if req.mask is None else decode_base64(req.mask, "mask", lim)
        files = (image, mask)
    images = read_edit_images(files[0], files[1], limits())
    default = masked_strength if images.mask is not None else DEFAULT_STRENGTH
    pending: Pending = {}
    return job_fields(images, req.strength, req.mask_blur, default, pending), pending
