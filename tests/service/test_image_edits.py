"""Image editing through the real stack (uvicorn API + Celery worker, PostgreSQL, Redis, the tiny pixel model):
`init_image`/`strength`/`mask` on /v1/images, and the OpenAI-compatible multipart /v1/images/edits."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
import openai
import pytest
import sqlalchemy as sa
from PIL import Image
from service_stack import Stack

SIZE = 32
BASE = {"width": SIZE, "height": SIZE, "steps": 3, "guidance_scale": 1.0, "seed": 1234}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _b64(img: Image.Image) -> str:
    return base64.b64encode(_png(img)).decode()


def _noise_image(seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def _quadrant_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[: SIZE // 2, : SIZE // 2] = 255  # white = repaint: the top-left quadrant
    return Image.fromarray(mask, "L")


def _run(stack: Stack, body: dict[str, Any]) -> tuple[dict[str, Any], Image.Image]:
    with stack.client(timeout=90) as c:
        r = c.post("/v1/images", json=body, headers={"Prefer": "wait=60"})
        assert r.status_code in (200, 202), r.text
        job = stack.wait_job(r.json()["id"], timeout=90)
        assert job["status"] == "succeeded", job
        img = Image.open(io.BytesIO(c.get(f"/v1/images/{job['id']}/files/0").content))
        img.load()
    return job, img


def test_strength_0_returns_the_init_image_and_the_job_stores_ids(live_worker: Stack) -> None:
    init = _noise_image(1)
    job, out = _run(live_worker, {**BASE, "prompt": "a red circle", "init_image": _b64(init), "strength": 0})
    # the pixel codec's round trip (x*2-1, then (x+1)/2, rounded to 8 bits) is exact
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(init))
    req = job["request"]
    assert req["init_image"].startswith("upl_") and len(req["init_image"]) == 36
    assert req["strength"] == 0 and req["mask"] is None and req["init_size"] == "32x32"
    assert "Edit mode: img2img" in out.text["parameters"]
    assert "Denoising strength: 0" in out.text["parameters"]
    stored = live_worker.workdir / "outputs" / "uploads" / f"{req['init_image']}.png"
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(init))


def test_strength_1_equals_text_to_image_with_the_same_seed(live_worker: Stack) -> None:
    _, t2i = _run(live_worker, {**BASE, "prompt": "a blue square"})
    _, edit = _run(
        live_worker, {**BASE, "prompt": "a blue square", "init_image": _b64(_noise_image(2)), "strength": 1}
    )
    assert np.array_equal(np.asarray(edit), np.asarray(t2i))
    assert "Denoising strength: 1" in edit.text["parameters"]
    _, half = _run(
        live_worker, {**BASE, "prompt": "a blue square", "init_image": _b64(_noise_image(2)), "strength": 0.5}
    )
    assert not np.array_equal(np.asarray(half), np.asarray(t2i))  # the init image does matter below 1


def test_default_strength_and_data_url(live_worker: Stack) -> None:
    url = "data:image/png;base64," + _b64(_noise_image(3))
    job, _ = _run(live_worker, {**BASE, "prompt": "x", "init_image": url})
    assert job["request"]["strength"] == 0.8


@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_inpainting_keeps_unmasked_pixels_exactly(live_worker: Stack, blur: float) -> None:
    init = _noise_image(4)
    body = {
        **BASE,
        "prompt": "a green triangle",
        "init_image": _b64(init),
        "mask": _b64(_quadrant_mask()),
        "strength": 1.0,
        "mask_blur": blur,
    }
    job, out = _run(live_worker, body)
    a, b = np.asarray(out.convert("RGB")), np.asarray(init)
    keep = np.asarray(_quadrant_mask()) == 0
    assert np.array_equal(a[keep], b[keep])
    assert (a[~keep] != b[~keep]).mean() > 0.5  # the masked quadrant was repainted
    assert "Edit mode: inpaint" in out.text["parameters"]
    assert f"Mask blur: {blur:g}" in out.text["parameters"]
    assert job["request"]["mask"].startswith("upl_") and job["request"]["mask_blur"] == blur


@pytest.mark.parametrize("field", ["strength", "mask"])
def test_edit_fields_without_an_init_image_are_422(stack: Stack, field: str) -> None:
    value = 0.5 if field == "strength" else _b64(_quadrant_mask())
    with stack.client() as c:
        r = c.post("/v1/images", json={**BASE, "prompt": "x", field: value})
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_openai_client_images_edit_b64_and_url(live_worker: Stack) -> None:
    client = openai.OpenAI(
        base_url=live_worker.base_url + "/v1", api_key=live_worker.api_key, timeout=90, max_retries=0
    )
    init = _noise_image(5)
    # OpenAI's mask convention: an RGBA PNG whose transparent pixels are the area to edit
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[SIZE // 2 :, SIZE // 2 :] = 0
    mask = Image.fromarray(np.dstack([np.asarray(init), alpha]), "RGBA")
    res = client.images.edit(
        image=("init.png", _png(init), "image/png"),
        mask=("mask.png", _png(mask), "image/png"),
        prompt="a yellow circle",
        n=2,
        size="32x32",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 21, "guidance_scale": 1.0},
    )
    assert len(res.data) == 2
    for item in res.data:
        out = Image.open(io.BytesIO(base64.b64decode(item.b64_json or "")))
        a, b = np.asarray(out.convert("RGB")), np.asarray(init)
        assert np.array_equal(a[alpha == 255], b[alpha == 255])
        assert "Edit mode: inpaint" in out.text["parameters"]
        assert "Denoising strength: 1" in out.text["parameters"]  # OpenAI's edits repaint the mask fully
    res = client.images.edit(
        image=("init.png", _png(init), "image/png"),
        prompt="by url",
        size="32x32",  # type: ignore[arg-type]
        response_format="url",
        extra_body={"steps": 1, "strength": 0.5},
    )
    assert res.data[0].url and "/v1/images/img_" in res.data[0].url
    with live_worker.client() as c:
        got = c.get(res.data[0].url)
    assert (
        got.status_code == 200
        and "Denoising strength: 0.5" in Image.open(io.BytesIO(got.content)).text["parameters"]
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("x.png", b"not an image at all", "image/png"), prompt="x")
    assert err.value.body["param"] == "image"  # type: ignore[index]


# -- untrusted uploads ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid-looking PNG header for 100 megapixels with a tiny IDAT: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _bad_cases() -> list[tuple[str, dict[str, Any], int, str]]:
    """(name, request kwargs, status, param): multipart edits and JSON /v1/images."""
    good = _png(_noise_image(6))
    bomb = _bomb_png()
    assert len(bomb) < 4096
    other_size = _png(Image.new("L", (SIZE * 2, SIZE), 255))
    big = b"\x89PNG\r\n\x1a\n" + bytes(30 * 2**20)  # a 30 MB multipart body
    big_b64 = big[: 30 * 2**20 * 3 // 4]  # a 30 MB JSON body once base64-encoded
    form = {"prompt": "x", "size": "32x32"}

    def multipart(image: bytes, mask: bytes | None = None) -> dict[str, Any]:
        files = {"image": ("i.png", image, "image/png")}
        if mask is not None:
            files["mask"] = ("m.png", mask, "image/png")
        return {"url": "/v1/images/edits", "data": form, "files": files}

    def json_body(image: bytes, mask: bytes | None = None) -> dict[str, Any]:
        body = {**BASE, "prompt": "x", "init_image": base64.b64encode(image).decode()}
        if mask is not None:
            body["mask"] = base64.b64encode(mask).decode()
        return {"url": "/v1/images", "json": body}

    return [
        ("not an image", multipart(b"hello, world " * 100), 400, "image"),
        ("truncated", multipart(good[: len(good) // 2]), 400, "image"),
        ("100 MP bomb", multipart(bomb), 400, "image"),
        ("mask size", multipart(good, other_size), 400, "mask"),
        ("30 MB", multipart(big), 413, "image"),
        ("json not an image", json_body(b"hello, world " * 100), 400, "init_image"),
        ("json bomb", json_body(bomb), 400, "init_image"),
        ("json mask size", json_body(good, other_size), 400, "mask"),
        ("json 30 MB", json_body(big_b64), 413, "init_image"),
    ]


def test_bad_uploads_are_4xx_and_create_no_job(stack: Stack, pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    uploads = stack.workdir / "outputs" / "uploads"

    def state() -> tuple[int, int]:
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
        return n, len(list(uploads.glob("*"))) if uploads.is_dir() else 0

    before = state()
    with stack.client(timeout=30) as c:
        for name, kwargs, status, param in _bad_cases():
            r = c.post(kwargs.pop("url"), **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == param, (name, err)
    # That the bomb is refused from its header, without decoding, is tests/service/test_uploads.py's check.
    assert state() == before  # no job, no stored upload: nothing reached a worker
    engine.dispose()
