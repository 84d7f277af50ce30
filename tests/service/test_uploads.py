"""Upload validation on real files made with PIL and zlib (app/uploads.py)."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from app.uploads import (
    UploadError,
    UploadLimits,
    decode_base64,
    header_size,
    load_image,
    read_edit_images,
    sniff_format,
    to_png,
)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(width: int = 40, height: int = 20) -> Image.Image:
    img = Image.new("RGB", (width, height), (40, 90, 160))
    ImageDraw.Draw(img).rectangle((0, 0, 7, 7), fill=(255, 0, 0))  # red block, top-left as stored
    return img


def _refused(data: bytes, field: str = "image", **limits) -> UploadError:
    with pytest.raises(UploadError) as info:
        load_image(data, field, UploadLimits(**limits))
    assert info.value.field == field
    return info.value


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(side: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side black pixels: every row is a filter byte + side/8 zero bytes."""
    row = b"\x00" * (1 + side // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_three_formats_load_and_their_headers_give_the_size(fmt):
    data = _encode(_picture(37, 23), fmt)
    assert sniff_format(data, "image") == {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    assert header_size(data, sniff_format(data, "image"), "image") == (37, 23)
    lossless = fmt == "PNG"
    img = load_image(data, "image")
    assert img.size == (37, 23)
    if lossless:
        assert np.array_equal(np.asarray(img), np.asarray(_picture(37, 23)))
    assert header_size(_encode(_picture(37, 23), "WEBP", lossless=True), "webp", "image") == (37, 23)  # VP8L


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is text",
        b"",
        _encode(_picture(), "GIF"),
        _encode(_picture(), "BMP"),
        b"RIFF\0\0\0\0WAVEfmt ",
    ],
)
def test_not_a_supported_image(data):
    err = _refused(data)
    assert err.problem == "unsupported_format" and err.status == 400 and "PNG, JPEG or WebP" in str(err)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt):
    data = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), fmt)
    for cut in (len(data) // 2, len(data) - 8):
        err = _refused(data[:cut])
        assert err.problem == "corrupt", (cut, err)
    assert _refused(data[:20]).problem == "corrupt"  # not even a whole header


@pytest.fixture
def pil_opens(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every PIL Image.open that app.uploads makes (the real one still runs): a refusal that opens nothing
    decoded nothing."""
    calls: list[object] = []
    real = Image.open

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr("app.uploads.Image.open", spy)
    return calls


def test_100_megapixel_png_of_a_few_kb_is_refused_from_its_header(pil_opens: list[object]) -> None:
    bomb = _png_bomb()
    assert len(bomb) < 16_000
    with pytest.warns(Image.DecompressionBombWarning):  # well-formed: PIL reads the same header, and warns
        assert Image.open(io.BytesIO(bomb)).size == (10_000, 10_000)
    pil_opens.clear()
    err = _refused(bomb)
    assert err.problem == "too_many_pixels" and err.limit == UploadLimits().max_pixels and err.status == 400
    assert "10000x10000" in err.message
    assert pil_opens == []  # header arithmetic only: PIL never opened, let alone inflated, the 100 Mpx
    assert load_image(_encode(_picture(), "PNG"), "image").size == (40, 20)
    assert pil_opens  # the spy sees the opens of an accepted upload


def test_huge_jpeg_and_webp_headers_are_refused_before_decoding():
    jpeg = bytearray(_encode(_picture(16, 16), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 12_000, 12_000)
    assert _refused(bytes(jpeg)).problem == "too_many_pixels"
    translucent = Image.new("RGBA", (16, 16), (1, 2, 3, 100))
    webp = bytearray(_encode(translucent, "WEBP"))  # alpha: an extended (VP8X) header
    assert webp[12:16] == b"VP8X"
    webp[24:30] = (20_000 - 1).to_bytes(3, "little") * 2
    assert _refused(bytes(webp)).problem == "too_many_pixels"


def test_pixel_limit_is_configurable():
    data = _encode(_picture(40, 20), "PNG")
    assert _refused(data, max_pixels=799).limit == 799
    assert load_image(data, "image", UploadLimits(max_pixels=800)).size == (40, 20)


def test_oversized_bytes_are_refused_before_anything_else(pil_opens: list[object]) -> None:
    body = _encode(_picture(), "PNG") + b"\0" * (30 * 10**6)  # a 30 MB body
    err = _refused(body)
    assert pil_opens == []
    assert err.problem == "too_large" and err.status == 413 and err.limit == 20 * 2**20
    assert _refused(b"not even an image" * 10, max_bytes=100).problem == "too_large"
    big = base64.b64encode(body).decode()
    with pytest.raises(UploadError) as info:
        decode_base64(big, "mask")
    assert info.value.problem == "too_large" and info.value.field == "mask"


def test_base64_and_data_urls():
    data = _encode(_picture(), "PNG")
    assert decode_base64(base64.b64encode(data).decode(), "image") == data
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode(), "image") == data
    with pytest.raises(UploadError, match="base64"):
        decode_base64("not*base64!", "image")


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20; shown rotated 90 degrees clockwise
    data = _encode(_picture(40, 20), "JPEG", exif=exif.tobytes(), quality=95)
    img = load_image(data, "image")
    assert img.size == (20, 40)
    arr = np.asarray(img).astype(int)
    assert arr[2, -3, 0] > 200 and arr[2, -3, 2] < 80  # the stored top-left block is now top-right
    assert arr[2, 2, 0] < 100
    # The mask must match the image as shown, not as stored.
    shown_mask = _encode(Image.new("L", (20, 40), 255), "PNG")
    stored_mask = _encode(Image.new("L", (40, 20), 255), "PNG")
    assert read_edit_images(data, shown_mask).mask.size == (20, 40)
    with pytest.raises(UploadError) as info:
        read_edit_images(data, stored_mask)
    assert (
        info.value.field == "mask" and info.value.problem == "size_mismatch" and info.value.limit == "20x40"
    )


def test_mask_of_another_size_is_refused():
    image = _encode(_picture(40, 20), "PNG")
    with pytest.raises(UploadError) as info:
        read_edit_images(image, _encode(Image.new("L", (41, 20)), "PNG"))
    err = info.value
    assert (err.field, err.problem, err.limit, err.status) == ("mask", "size_mismatch", "40x20", 400)


def test_transparent_pixels_of_an_image_without_mask_are_the_mask():
    rgba = Image.new("RGBA", (40, 20), (10, 200, 30, 255))
    ImageDraw.Draw(rgba).rectangle((20, 10, 39, 19), fill=(0, 0, 0, 0))  # transparent quadrant
    ImageDraw.Draw(rgba).rectangle((0, 0, 3, 3), fill=(10, 200, 30, 128))  # half transparent corner
    edit = read_edit_images(_encode(rgba, "PNG"))
    assert edit.mask_from_alpha and edit.image.mode == "RGB" and edit.mask.mode == "L"
    mask = np.asarray(edit.mask)
    assert (mask[10:, 20:] == 255).all() and (mask[:10][:, 4:] == 0).all() and mask[0, 0] == 127
    opaque = read_edit_images(_encode(Image.new("RGBA", (40, 20), (1, 2, 3, 255)), "PNG"))
    assert opaque.mask is None and not opaque.mask_from_alpha  # fully opaque: plain image-to-image


def test_mask_files_white_or_transparent_means_repaint():
    image = _encode(_picture(40, 20), "PNG")
    grey = Image.new("L", (40, 20), 0)
    ImageDraw.Draw(grey).rectangle((0, 0, 19, 19), fill=255)
    edit = read_edit_images(image, _encode(grey, "PNG"))
    assert not edit.mask_from_alpha and np.array_equal(np.asarray(edit.mask), np.asarray(grey))
    openai_style = Image.new("RGBA", (40, 20), (0, 0, 0, 255))  # black, opaque: keep
    ImageDraw.Draw(openai_style).rectangle((0, 0, 19, 19), fill=(0, 0, 0, 0))  # transparent: repaint
    edit = read_edit_images(image, _encode(openai_style, "PNG"))
    assert np.array_equal(np.asarray(edit.mask), np.asarray(grey))
    # An RGBA image with its own transparency plus a mask file: the mask file decides.
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    assert np.array_equal(
        np.asarray(read_edit_images(_encode(rgba, "PNG"), _encode(grey, "PNG")).mask), np.asarray(grey)
    )
    bad = _encode(Image.new("L", (40, 20)), "GIF")
    with pytest.raises(UploadError) as info:
        read_edit_images(image, bad)
    assert info.value.field == "mask" and info.value.problem == "unsupported_format"


def test_validated_images_are_stored_as_png_written_here():
    edit = read_edit_images(_encode(_picture(), "JPEG"))
    png = to_png(edit.image)
    assert sniff_format(png, "image") == "png" and np.array_equal(
        np.asarray(load_image(png, "image")), np.asarray(edit.image)
    )


def test_module_is_torch_free():
    code = "import sys, app.uploads; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
