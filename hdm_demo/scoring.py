"""The one demo scorer: does a generated image show the prompted colour and shape?

The synthetic backgrounds are achromatic, so the saturated pixels of a generated image are the drawn shape.
Colour = the palette colour most of those pixels are nearest to in hue (`dominant_colour`). Shape = the circle,
square or triangle template (drawn like `hdm_demo.shapes.render` draws it, fitted to the pixels' bounding box) that
overlaps them best (`dominant_shape`). Both recognise 100 % of the data set's own images at 32 and 64 px
(tests/train/test_data.py). `score` turns them into accuracies; `make demo` and `python -m bench.demo_eval` use it.
"""

from __future__ import annotations

import colorsys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hdm_demo.shapes import COLOURS, SHAPES, SUPERSAMPLE, ShapeSpec


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
    offs = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
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
    return inside.reshape(k, h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(2, 4))


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


@dataclass(frozen=True)
class Scores:
    """Accuracies over `images` scored images. Chance is 1/6 for colour, 1/3 for shape, 1/18 for both."""

    images: int
    colour: float
    shape: float
    both: float
    control_wrong_colour: (
        float  # scored against the prompt's colour rotated by one palette step: stays near chance
    )
    predicted_colours: dict[str, int] = field(default_factory=dict)
    shape_confusion: dict[str, int] = field(default_factory=dict)

    def fractions(self) -> dict[str, float]:
        return {"colour": self.colour, "shape": self.shape, "both": self.both}


def score(images: Sequence[Image.Image], specs: Sequence[ShapeSpec | Mapping[str, str]]) -> Scores:
    """Score each image against its prompt's `colour` and `shape` (a ShapeSpec or a dict with those keys)."""
    if len(images) != len(specs) or not images:
        raise ValueError("need one prompt per image, and at least one image")
    names = list(COLOURS)
    colour = shape = both = control = 0
    predicted: Counter[str] = Counter()
    confusion: Counter[str] = Counter()
    for img, spec in zip(images, specs, strict=True):
        want_colour, want_shape = (spec["colour"], spec["shape"]) if isinstance(spec, Mapping) else (
            spec.colour, spec.shape)  # fmt: skip
        got_colour, got_shape = dominant_colour(img), dominant_shape(img)
        predicted[got_colour or "none"] += 1
        confusion[f"{want_shape}->{got_shape}"] += 1
        colour += got_colour == want_colour
        shape += got_shape == want_shape
        both += got_colour == want_colour and got_shape == want_shape
        control += got_colour == names[(names.index(want_colour) + 1) % len(names)]
    n = len(images)
    return Scores(
        n, colour / n, shape / n, both / n, control / n, dict(predicted), dict(sorted(confusion.items()))
    )


def score_files(files: Sequence[Path], specs: Sequence[ShapeSpec | Mapping[str, str]]) -> Scores:
    """`score` for images on disk."""
    images = []
    for path in files:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return score(images, specs)
