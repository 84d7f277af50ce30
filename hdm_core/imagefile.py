"""Write images with A1111-style generation parameters (PNG ``parameters`` text chunk; EXIF UserComment), and read
such a text back.

Values are quoted as A1111 quotes them (``generation_parameters_copypaste.quote``: a value holding a comma, colon or
newline is written as a JSON string). Readers that split the line at every comma (sd-parsers 0.6) still cut a
quoted value, so the multi-part values written here (Camera, TREAD guidance, Schedule times) hold no comma:
``x_shift 0.25 y_shift 0 zoom 1``, ``1 0.9368 0.8318 ... 0``."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import SAMPLER_INFO

EXT = {"png": "png", "webp": "webp", "jpeg": "jpg"}
# A1111's field pattern (generation_parameters_copypaste.re_param): `Key: value` or `Key: "json string"`
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA = re.compile(r"<lora:([^:>]+):([-+0-9.eE]+)>")


def quote(value: object) -> str:
    """A1111's quoting: a value with a comma, colon or newline becomes a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _a1111_sampler(name: str) -> str:
    """A1111's name of a sampler ("DPM++ 2M", "UniPC", "Euler a"), as its infotext parser reads it back."""
    info = SAMPLER_INFO.get(name)
    return info.a1111 if info is not None else name


def schedule_fields(schedule: str | None, times: Sequence[float]) -> tuple[str, ...]:
    """`Schedule times` for the `tuned` schedule, whose times are the model's own (its schedule file, which may be
    searched again), so the image says which times drew it; the other schedules are formulas of the steps."""
    if schedule != "tuned" or not times:
        return ()
    return ("Schedule times: " + " ".join(f"{t:.6g}" for t in times),)


def parameters_text(
    req: dict[str, Any],
    *,
    seed: int,
    model_name: str,
    model_hash: str | None,
    adapters: Sequence[tuple[str, float, str | None]] = (),
    extra: Sequence[str] = (),
) -> str:
    """A1111's layout. ``adapters``: (name, weight, sha256) each, written as A1111 writes LoRAs: a
    ``<lora:name:weight>`` tag per adapter after the prompt and a ``Lora hashes`` field (first 10 hex digits).
    ``extra``: more ``key: value`` fields (an edit's mode and strength, hdm_core.edit.EditInfo)."""
    cam = req.get("camera") or {}
    tread = req.get("tread_guidance") or {}
    pairs = [
        ("Steps", req["steps"]),
        ("Sampler", _a1111_sampler(req["sampler"])),
        *([("Schedule type", req["schedule"].capitalize())] if req.get("schedule") else []),
        ("CFG scale", req["guidance_scale"]),
        ("Seed", seed),
        ("Size", f"{req['width']}x{req['height']}"),
        *([("Model hash", model_hash[:10])] if model_hash else []),
        ("Model", model_name),
        (
            "Camera",
            f"x_shift {cam.get('x_shift', 0)} y_shift {cam.get('y_shift', 0)} zoom {cam.get('zoom', 1)}",
        ),
        ("TREAD guidance", f"cond {tread.get('cond_rate', 0)} uncond {tread.get('uncond_rate', 0)}"),
        *([("Lora hashes", ", ".join(f"{n}: {(h or '')[:10]}" for n, _, h in adapters))] if adapters else []),
    ]
    fields = [f"{k}: {quote(v)}" for k, v in pairs] + [*extra, "Version: hdm-serve"]
    prompt = " ".join([req["prompt"], *(f"<lora:{n}:{w:g}>" for n, w, _ in adapters)])
    return f"{prompt}\nNegative prompt: {req.get('negative_prompt', '')}\n" + ", ".join(fields)


def save(image: Image.Image, path: Path, fmt: str, parameters: str) -> None:
    """Atomic write (temp file then rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(tmp, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        image.save(tmp, format="WEBP" if fmt == "webp" else "JPEG", exif=exif.tobytes(), quality=95)
    os.replace(tmp, path)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of an A1111 ``parameters`` text, as A1111's own reader splits it: the last
    line holding `Steps:` is the fields line, a line starting `Negative prompt:` starts the negative prompt, quoted
    values are JSON strings."""
    lines = text.strip().split("\n")
    idx = next((i for i in range(len(lines) - 1, -1, -1) if "Steps:" in lines[i]), None)
    fields: dict[str, str] = {}
    if idx is not None:
        for key, value in _PARAM.findall(lines[idx]):
            if value.startswith('"') and value.endswith('"'):
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
            fields[key.strip()] = value.strip()
        lines = lines[:idx]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its ``<lora:name:weight>`` tags, and the tags."""
    tags = [(m[1], float(m[2])) for m in _LORA.finditer(prompt)]
    return re.sub(r"\s+", " ", _LORA.sub("", prompt)).strip(), tags


def named_numbers(value: str) -> dict[str, float]:
    """``x_shift 0.25 y_shift 0 zoom 1`` (also with commas between the pairs) -> {"x_shift": 0.25, ...}."""
    return {k: float(v) for k, v in re.findall(r"([A-Za-z_]+)\s+(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)", value)}
