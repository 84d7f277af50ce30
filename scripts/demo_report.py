"""What the demo shows a person: held-out prompts, a labelled contact sheet and a loss curve.

The images are scored by the demo kit's one scorer, `hdm_demo.scoring` (its docstring states the method).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from hdm_demo.shapes import BACKGROUNDS, COLOURS


def pick_prompts(heldout_json: Path, per_colour: int = 2) -> list[dict]:
    """A fixed selection of held-out combinations: `per_colour` for every palette colour, with varied shapes and
    the backgrounds taken in turn."""
    specs = json.loads(Path(heldout_json).read_text())
    backgrounds = list(BACKGROUNDS)
    chosen: list[dict] = []
    for ci, colour in enumerate(COLOURS):
        mine = [s for s in specs if s["colour"] == colour]
        for k in range(per_colour):
            shapes = {c["shape"] for c in chosen if c["colour"] == colour}
            options = [s for s in mine if s["shape"] not in shapes and s not in chosen] or [
                s for s in mine if s not in chosen
            ]
            if not options:
                break
            want = backgrounds[(ci * per_colour + k) % len(backgrounds)]
            chosen.append(next((s for s in options if s["background"] == want), options[0]))
    return chosen


def contact_sheet(
    files: Sequence[Path], labels: Sequence[str], out: Path, *, cell: int = 192, columns: int = 4
) -> Path:
    """A grid of the images, each upscaled to `cell` px with its prompt written under it."""
    rows = (len(files) + columns - 1) // columns
    label_h = 34
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (path, label) in enumerate(zip(files, labels, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        with Image.open(path) as img:
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words, lines = label.split(), [""]
        for word in words:  # wrap to the cell width
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial) > cell - 6 and lines[-1]:
                lines.append(word)
            else:
                lines[-1] = trial
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines[:3]), fill=(0, 0, 0), spacing=1)
    sheet.save(out)
    return out


def loss_curve(points: Sequence[tuple[int, float]], out: Path, *, size: tuple[int, int] = (640, 360)) -> Path:
    """Training loss per step (raw, and a running mean) drawn with PIL: no plotting dependency."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 15, 25, h - 35
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 5), "training loss (flow matching MSE) per step", fill=(0, 0, 0))
    if points:
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        l0, l1 = min(losses), max(losses)
        l1 = l1 if l1 > l0 else l0 + 1e-6

        def xy(step: float, loss: float) -> tuple[float, float]:
            return (
                left + (right - left) * (step - s0) / (s1 - s0),
                bottom - (bottom - top) * (loss - l0) / (l1 - l0),
            )

        draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
        k = max(1, len(points) // 30)
        smooth = [
            (steps[i], sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]))
            for i in range(len(points))
        ]
        draw.line([xy(s, v) for s, v in smooth], fill=(20, 60, 180), width=2)
        for frac in (0.0, 0.5, 1.0):
            v = l0 + frac * (l1 - l0)
            draw.text((5, xy(s0, v)[1] - 6), f"{v:.3f}", fill=(0, 0, 0))
        draw.text((left, bottom + 8), f"step {s0}", fill=(0, 0, 0))
        draw.text((right - 70, bottom + 8), f"step {s1}", fill=(0, 0, 0))
    img.save(out)
    return out
