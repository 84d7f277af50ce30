"""Validation of untrusted image uploads for editing (issue 13). Pure: PIL only, no torch, no web framework.

Order of checks, cheapest first, so a hostile file costs no decode: byte limit -> format by magic bytes (PNG, JPEG,
WebP only) -> width x height read from the format's own header by this module and checked against the pixel limit
(a 100-megapixel PNG of a few KB is refused here) -> full decode (truncated or corrupt files are refused) -> EXIF
orientation applied -> alpha and mask rules (`read_edit_images`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageChops, ImageOps

Field = Literal["image", "mask"]
ImageFormat = Literal["png", "jpeg", "webp"]
Problem = Literal["too_large", "too_many_pixels", "unsupported_format", "corrupt", "size_mismatch"]

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# JPEG start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


class UploadError(ValueError):
    """A refused upload: `field` ("image" / "mask"), what is wrong, and the limit it broke (bytes, pixels, the
    expected "WxH", or the accepted formats). `status` is the HTTP status the API should answer with."""

    def __init__(
        self, field: Field, problem: Problem, message: str, *, limit: int | str | None = None
    ) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.problem, self.message, self.limit = field, problem, message, limit

    @property
    def status(self) -> int:
        return 413 if self.problem == "too_large" else 400


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 2**20  # per file, after base64 decoding
    max_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"upload limits must be positive, got {self}")


def check_byte_count(n: int, field: Field, limits: UploadLimits) -> None:
    """For a declared length (Content-Length, a multipart part's size) before the bytes are read."""
    if n > limits.max_bytes:
        raise UploadError(
            field, "too_large", f"{n} bytes exceeds the limit of {limits.max_bytes}", limit=limits.max_bytes
        )


def decode_base64(text: str, field: Field, limits: UploadLimits = UploadLimits()) -> bytes:
    """Plain base64 or a `data:image/...;base64,` URL. The length is checked before decoding."""
    payload = re.sub(r"^data:[\w/+.-]*;base64,", "", text.strip(), count=1)
    check_byte_count(len(payload) * 3 // 4 - 2, field, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(field, "corrupt", "is not valid base64") from None


def sniff_format(data: bytes, field: Field) -> ImageFormat:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise UploadError(
        field, "unsupported_format", "is not a PNG, JPEG or WebP image", limit="png, jpeg, webp"
    )


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers carry no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk, body = data[12:16], data[20:30]
    if chunk == b"VP8X" and len(body) >= 10:
        return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
    return None


def header_size(data: bytes, fmt: ImageFormat, field: Field) -> tuple[int, int]:
    """(width, height) from the file header alone; nothing is decompressed."""
    size: tuple[int, int] | None = None
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        size = struct.unpack(">II", data[16:24])
    elif fmt == "jpeg":
        size = _jpeg_size(data)
    elif fmt == "webp":
        size = _webp_size(data)
    if size is None or min(size) < 1:
        raise UploadError(field, "corrupt", f"has no readable {fmt.upper()} header (truncated or corrupt)")
    return size


def load_image(data: bytes, field: Field, limits: UploadLimits = UploadLimits()) -> Image.Image:
    """Validate and decode one upload; EXIF orientation applied, mode as stored (alpha kept)."""
    check_byte_count(len(data), field, limits)
    fmt = sniff_format(data, field)
    width, height = header_size(data, fmt, field)
    if width * height > limits.max_pixels:
        raise UploadError(
            field,
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}",
            limit=limits.max_pixels,
        )
    try:
        if fmt == "png":  # chunk CRCs through IEND, without inflating the pixels
            Image.open(io.BytesIO(data), formats=["PNG"]).verify()
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
        if image.size != (width, height):
            raise ValueError(f"decoder size {image.size} differs from the header's {(width, height)}")
        image.load()
        return ImageOps.exif_transpose(image)
    except (
        Exception
    ) as exc:  # any decoder failure on untrusted bytes is the upload's fault, not a server error
        raise UploadError(field, "corrupt", f"could not be decoded as {fmt.upper()}: {exc}") from None


@dataclass(frozen=True)
class EditImages:
    """A validated edit request: `image` RGB; `mask` L of the same size (white = repaint) or None for image-to-image;
    `mask_from_alpha`: the mask is the image's own transparency."""

    image: Image.Image
    mask: Image.Image | None
    mask_from_alpha: bool = False


def _transparency(image: Image.Image) -> Image.Image | None:
    """255 - alpha (transparent = repaint, as OpenAI's images.edit), or None if the image is fully opaque."""
    if not image.has_transparency_data:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema() == (255, 255) else ImageChops.invert(alpha)


def read_edit_images(
    image: bytes, mask: bytes | None = None, limits: UploadLimits = UploadLimits()
) -> EditImages:
    """The image and optional mask of an edit request.

    Mask rules: a mask with transparency uses it (transparent = repaint, OpenAI's convention), any other mask its
    grey level (white = repaint); without a mask, an image with transparency uses it as the mask; a fully opaque
    image without a mask is plain image-to-image. The mask must have the image's size (after EXIF orientation)."""
    img = load_image(image, "image", limits)
    if mask is None:
        alpha_mask = _transparency(img)
        return EditImages(img.convert("RGB"), alpha_mask, mask_from_alpha=alpha_mask is not None)
    m = load_image(mask, "mask", limits)
    if m.size != img.size:
        expected = f"{img.width}x{img.height}"
        raise UploadError(
            "mask", "size_mismatch", f"is {m.width}x{m.height} but the image is {expected}", limit=expected
        )
    alpha_mask = _transparency(m)
    return EditImages(img.convert("RGB"), alpha_mask if alpha_mask is not None else m.convert("L"))


def to_png(image: Image.Image) -> bytes:
    """Re-encode a validated image, so what is stored for the worker is a PNG this service wrote itself."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
