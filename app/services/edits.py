"""Init images and masks of edit requests (issue 13).

The API process validates an upload (app/uploads.py: byte limit, format, pixel limit from the header, full decode)
before any job exists, re-encodes it as a PNG of its own under ``HDM_UPLOADS_DIR`` (default
``HDM_OUTPUTS_DIR/uploads``) named by its content hash, and the job stores only that id. The worker opens the file
by id (``path``); no image bytes go through the broker or the jobs table.
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


def _store(image: Image.Image) -> str:
    data = to_png(image)
    upload_id = "upl_" + hashlib.sha256(data).hexdigest()[:32]
    file = path(upload_id)
    if not file.is_file():  # same content, same id: a repeated request writes nothing
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, file)
    return upload_id


def job_fields(
    images: EditImages, strength: float | None, mask_blur: float, default_strength: float
) -> dict[str, Any]:
    """What the job stores: upload ids, never bytes."""
    has_mask = images.mask is not None
    return {
        "init_image": _store(images.image),
        "mask": _store(images.mask) if images.mask is not None else None,
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
) -> dict[str, Any] | None:
    """The request's edit fields as the job stores them, or None for text-to-image. Decodes images: call it from a
    worker thread. ``files``: the image and mask of a multipart upload (else the base64 fields of ``req``);
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
    return job_fields(images, req.strength, req.mask_blur, default)
