"""Write images with A1111-style generation parameters (PNG ``parameters`` text chunk; EXIF UserComment)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import SAMPLER_INFO

EXT = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def _a1111_sampler(name: str) -> str:
    """A1111's name of a sampler ("DPM++ 2M", "UniPC", "Euler a"), as its infotext parser reads it back."""
    info = SAMPLER_INFO.get(name)
    return info.a1111 if info is not None else name


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
    fields = [
        f"Steps: {req['steps']}",
        f"Sampler: {_a1111_sampler(req['sampler'])}",
        *([f"Schedule type: {req['schedule'].capitalize()}"] if req.get("schedule") else []),
        f"CFG scale: {req['guidance_scale']}",
        f"Seed: {seed}",
        f"Size: {req['width']}x{req['height']}",
        *([f"Model hash: {model_hash[:10]}"] if model_hash else []),
        f"Model: {model_name}",
        f"Camera: x_shift {cam.get('x_shift', 0)}, y_shift {cam.get('y_shift', 0)}, zoom {cam.get('zoom', 1)}",
        f"TREAD guidance: cond {tread.get('cond_rate', 0)}, uncond {tread.get('uncond_rate', 0)}",
        *(
            ['Lora hashes: "' + ", ".join(f"{n}: {(h or '')[:10]}" for n, _, h in adapters) + '"']
            if adapters
            else []
        ),
        *extra,
        "Version: hdm-serve",
    ]
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
