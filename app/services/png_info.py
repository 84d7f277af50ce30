"""``POST /v1/images/parameters`` (A1111's "PNG Info" / "send to txt2img"): the A1111 ``parameters`` text of an
image this service (or another A1111-style tool) wrote, read back into a ``POST /v1/images`` body. Fields the reader
does not know stay in ``fields``; the request is not validated here (POST it and the usual 422s name what is off)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from app.errors import Invalid
from app.uploads import UploadLimits, load_image
from hdm_core.config import SAMPLER_INFO, SCHEDULE_NAMES
from hdm_core.imagefile import lora_tags, named_numbers, parse_parameters

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _text(data: bytes) -> str | None:
    image = Image.open(io.BytesIO(data))
    if isinstance(image.info.get("parameters"), str):
        return str(image.info["parameters"])
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
        return comment[8:].decode("utf-16-be", "replace")
    return comment if isinstance(comment, str) else None


def _number(fields: dict[str, str], key: str, kind: type) -> Any:
    try:
        return kind(fields[key]) if key in fields else None
    except ValueError:
        return None


def read(data: bytes, limits: UploadLimits) -> dict[str, Any]:
    """{"request": a POST /v1/images body, "parameters": the text, "fields": every field as written}."""
    load_image(data, "file", limits)  # type: ignore[arg-type]  # magic bytes, pixel limit, full decode (app/uploads.py)
    text = _text(data)
    if not text:
        raise Invalid("The image holds no A1111 'parameters' text.", param="file", code="no_parameters")
    prompt, negative, fields = parse_parameters(text)
    prompt, tags = lora_tags(prompt)
    req: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for key, name, kind in (
        ("Steps", "steps", int),
        ("CFG scale", "guidance_scale", float),
        ("Seed", "seed", int),
    ):
        value = _number(fields, key, kind)
        if value is not None:
            req[name] = value
    if "Sampler" in fields:  # A1111's name ("DPM++ 2M") back to ours ("dpmpp_2m"); an unknown one as written
        by_a1111 = {info.a1111: name for name, info in SAMPLER_INFO.items()}
        req["sampler"] = by_a1111.get(fields["Sampler"], fields["Sampler"])
    if fields.get("Schedule type", "").lower() in SCHEDULE_NAMES:
        req["schedule"] = fields["Schedule type"].lower()
    width, _, height = fields.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        req["width"], req["height"] = int(width), int(height)
    if "Model" in fields:
        req["model"] = fields["Model"]
    if "Camera" in fields:
        req["camera"] = named_numbers(fields["Camera"])
    if "TREAD guidance" in fields:
        rates = named_numbers(fields["TREAD guidance"])
        req["tread_guidance"] = {f"{k}_rate": v for k, v in rates.items() if k in ("cond", "uncond")}
    if tags:
        req["adapters"] = [{"id": name, "weight": weight} for name, weight in tags]
    return {"request": req, "parameters": text, "fields": fields}
