"""A synthetic captioned dataset: coloured shapes on plain backgrounds, for CPU demos and tests.

`python -m hdm_core.synthetic OUT_DIR --count N --size S [--seed 0]` writes N images (`00000.png` + `00000.txt`),
plus `heldout.json`: prompts for colour/shape/position combinations that never occur in the written set, so a model
can be checked on captions it has not seen. `dominant_colour` classifies a generated image by the hue of its
saturated pixels (backgrounds are achromatic) and `dominant_shape` by the shape template that overlaps those pixels
best; `make demo` and `python -m bench.demo_eval` score generated images with them.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Saturated shape colours with hues at least ~55 degrees apart, and achromatic backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 215, 30),
    "green": (30, 180, 40),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "magenta": (200, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (name, centre y, centre x) as fractions of the image side.
POSITIONS: tuple[tuple[str, float, float], ...] = (
    ("top left", 0.32, 0.32),
    ("top right", 0.32, 0.68),
    ("bottom left", 0.68, 0.32),
    ("bottom right", 0.68, 0.68),
    ("center", 0.5, 0.5),
)
_SUPERSAMPLE = 4
# Half the shape's side as a fraction of the image side, and the centre's jitter: shapes about half the image wide,
# so that at 32 px (the demo) a circle, a square and a triangle differ by whole pixels, never clipped by the border.
HALF_SIZE = (0.24, 0.29)
JITTER = 0.03


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position} on a {self.background} background"


def is_heldout(colour: str, shape: str, position: str) -> bool:
    """About one (colour, shape, position) combination in seven is kept out of the training set."""
    ci = list(COLOURS).index(colour)
    si = SHAPES.index(shape)
    pi = [p[0] for p in POSITIONS].index(position)
    return (ci + 2 * si + 3 * pi) % 7 == 0


def all_specs(*, heldout: bool) -> list[ShapeSpec]:
    """Every combination that is (heldout=True) or is not (heldout=False) held out."""
    return [
        ShapeSpec(c, s, p[0], b)
        for c in COLOURS
        for s in SHAPES
        for p in POSITIONS
        for b in BACKGROUNDS
        if is_heldout(c, s, p[0]) == heldout
    ]


def render(spec: ShapeSpec, size: int, rng: random.Random) -> Image.Image:
    """Draw one image: the shape with a little jitter in size and position, antialiased by supersampling."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    _, cy, cx = next(p for p in POSITIONS if p[0] == spec.position)
    half = big * rng.uniform(*HALF_SIZE)
    cy = (cy + rng.uniform(-JITTER, JITTER)) * big
    cx = (cx + rng.uniform(-JITTER, JITTER)) * big
    fill = COLOURS[spec.colour]
    box = (cx - half, cy - half, cx + half, cy + half)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {SHAPES}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def recipe(*, count: int, size: int, seed: int) -> dict:
    """Everything that decides the written set; stored as `synthetic.json` so a changed recipe is not reused."""
    return {
        "count": count,
        "size": size,
        "seed": seed,
        "half_size": list(HALF_SIZE),
        "jitter": JITTER,
        "positions": [list(p) for p in POSITIONS],
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
    }


def is_generated(out_dir: str | Path, *, count: int, size: int = 64, seed: int = 0) -> bool:
    """True if `out_dir` holds a complete set written by this recipe (`generate_dataset` writes its files last)."""
    marker = Path(out_dir) / "synthetic.json"
    try:
        return json.loads(marker.read_text()) == json.loads(
            json.dumps(recipe(count=count, size=size, seed=seed))
        )
    except (OSError, ValueError):
        return False


def generate_dataset(out_dir: str | Path, *, count: int, size: int = 64, seed: int = 0) -> Path:
    """Write `count` captioned images of `size` px (only non-held-out combinations), `heldout.json` and
    `synthetic.json`; images of an earlier set in the folder are removed first."""
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count} size={size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic.json").unlink(missing_ok=True)
    for old in [*out.glob("[0-9][0-9][0-9][0-9][0-9].png"), *out.glob("[0-9][0-9][0-9][0-9][0-9].txt")]:
        old.unlink()
    rng = random.Random(seed)
    specs = all_specs(heldout=False)
    for i in range(count):
        spec = specs[i % len(specs)] if i < len(specs) else rng.choice(specs)
        render(spec, size, rng).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(spec.caption + "\n", encoding="utf-8")
    heldout = [asdict(s) | {"caption": s.caption} for s in all_specs(heldout=True)]
    (out / "heldout.json").write_text(json.dumps(heldout, indent=1), encoding="utf-8")
    (out / "synthetic.json").write_text(
        json.dumps(recipe(count=count, size=size, seed=seed)), encoding="utf-8"
    )
    logger.info("wrote %d images of %dpx to %s (%d held-out prompts)", count, size, out, len(heldout))
    return out


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def dominant_colour(
    img: Image.Image, *, min_saturation: float = 0.35, min_value: float = 0.2, min_fraction: float = 0.01
) -> str | None:
    """The palette colour whose hue most saturated pixels are nearest to; None if under `min_fraction` are saturated.

    Backgrounds are achromatic, so the saturated pixels are the shape; each votes for its nearest palette hue.
    """
    raw = img.convert("HSV").tobytes()
    votes = dict.fromkeys(_PALETTE_HUES, 0)
    for i in range(0, len(raw), 3):
        h, s, v = raw[i], raw[i + 1], raw[i + 2]
        if s / 255 < min_saturation or v / 255 < min_value:
            continue
        hue = h / 255
        best = min(_PALETTE_HUES, key=lambda name: _hue_distance(hue, _PALETTE_HUES[name]))
        votes[best] += 1
    total = sum(votes.values())
    if total < min_fraction * (len(raw) // 3):
        return None
    return max(votes, key=lambda k: votes[k])


def _shape_mask(img: Image.Image, min_saturation: float, min_value: float) -> np.ndarray:
    """(H, W) bool: the saturated pixels, i.e. the drawn shape (backgrounds are achromatic)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255
    return (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)


def _coverage(
    shape: str, cy: np.ndarray, cx: np.ndarray, half: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """(K, H, W) fraction of each pixel a template covers, for K candidate (cy, cx, half) in pixels.

    The same geometry as `render` (triangle apex up), sampled 4x4 per pixel like its supersampling.
    """
    h, w = size
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)  # (H*4,)
    xs = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)  # (W*4,)
    dy = ys[None, :, None] - cy[:, None, None]  # (K, H*4, 1)
    dx = xs[None, None, :] - cx[:, None, None]  # (K, 1, W*4)
    r = half[:, None, None]
    if shape == "circle":
        inside = dy**2 + dx**2 <= r**2
    elif shape == "square":
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    elif shape == "triangle":
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    k = len(cy)
    return inside.reshape(k, h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(2, 4))


def shape_scores(
    img: Image.Image, *, min_saturation: float = 0.35, min_value: float = 0.2
) -> dict[str, float]:
    """Best overlap (IoU) of the saturated pixels with each shape's template, searched around their bounding box.

    Every shape of `render` fills a 2*half square, so the box of the mask (1st-99th percentile, ignoring strays)
    gives the centre and size; a small search (+-1 px, +-20 % size) absorbs blur and antialiasing.
    """
    return _template_scores(_shape_mask(img, min_saturation, min_value).astype(np.float32))


def _template_scores(mask: np.ndarray) -> dict[str, float]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return dict.fromkeys(SHAPES, 0.0)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    half0 = max(y1 - y0 + 1, x1 - x0 + 1) / 2
    shifts = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    scales = np.array([0.8, 0.9, 1.0, 1.1, 1.2])
    cy, cx, half = np.meshgrid(
        (y0 + y1 + 1) / 2 + shifts, (x0 + x1 + 1) / 2 + shifts, half0 * scales, indexing="ij"
    )
    cy, cx, half = cy.reshape(-1), cx.reshape(-1), half.reshape(-1)
    scores = {}
    for shape in SHAPES:
        cov = _coverage(shape, cy, cx, half, mask.shape)  # (K, H, W)
        inter = np.minimum(cov, mask).sum(axis=(1, 2))
        union = np.maximum(cov, mask).sum(axis=(1, 2))
        scores[shape] = float((inter / union).max())
    return scores


def dominant_shape(
    img: Image.Image, *, min_saturation: float = 0.35, min_value: float = 0.2, min_fraction: float = 0.01
) -> str | None:
    """The shape whose template best overlaps the saturated pixels; None if under `min_fraction` are saturated."""
    mask = _shape_mask(img, min_saturation, min_value)
    if mask.sum() < min_fraction * mask.size:
        return None
    scores = _template_scores(mask.astype(np.float32))
    return max(scores, key=lambda k: scores[k])


def colour_accuracy(images: Sequence[Image.Image], colours: Sequence[str]) -> float:
    """Fraction of images whose dominant colour is the prompted one."""
    if len(images) != len(colours) or not images:
        raise ValueError("need as many prompted colours as images, and at least one")
    return sum(dominant_colour(img) == c for img, c in zip(images, colours, strict=True)) / len(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdm_core.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate_dataset(args.out_dir, count=args.count, size=args.size, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
