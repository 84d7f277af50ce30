"""The synthetic shapes set: coloured shapes on plain backgrounds, for CPU demos and tests.

`generate_dataset(OUT, count=N, size=S)` (CLI: `python -m hdm_demo.assets --data OUT --count N --size S`) writes N
images (`00000.png` + `00000.txt`), plus `heldout.json`: prompts for colour/shape/position combinations that never
occur in the written set, so a model can be checked on captions it has not seen (`hdm_demo.scoring` scores them).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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
SUPERSAMPLE = 4
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
    big = size * SUPERSAMPLE
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


def _drawable(colours: Sequence[str] | None) -> list[ShapeSpec]:
    return [s for s in all_specs(heldout=False) if colours is None or s.colour in colours]


def recipe(*, count: int, size: int, seed: int, colours: Sequence[str] | None = None) -> dict:
    """Everything that decides the written set; stored as `synthetic.json` so a changed recipe is not reused."""
    drawn = {"drawn_colours": list(colours)} if colours is not None else {}
    if count < len(_drawable(colours)):
        drawn["first"] = "sample"  # see generate_dataset; sets of every combination keep their earlier recipe
    return drawn | {
        "count": count,
        "size": size,
        "seed": seed,
        "half_size": list(HALF_SIZE),
        "jitter": JITTER,
        "positions": [list(p) for p in POSITIONS],
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
    }


def is_generated(
    out_dir: str | Path, *, count: int, size: int = 64, seed: int = 0, colours: Sequence[str] | None = None
) -> bool:
    """True if `out_dir` holds a complete set written by this recipe (`generate_dataset` writes its files last)."""
    marker = Path(out_dir) / "synthetic.json"
    try:
        return json.loads(marker.read_text()) == json.loads(
            json.dumps(recipe(count=count, size=size, seed=seed, colours=colours))
        )
    except (OSError, ValueError):
        return False


def generate_dataset(
    out_dir: str | Path,
    *,
    count: int,
    size: int = 64,
    seed: int = 0,
    colours: Sequence[str] | None = None,
) -> Path:
    """Write `count` captioned images of `size` px (only non-held-out combinations), `heldout.json` and
    `synthetic.json`; images of an earlier set in the folder are removed first.

    `colours`: draw only these palette colours (default all); a colour left out appears in no image and no caption
    (the adapter bench pretrains without one, then teaches it with an adapter)."""
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count} size={size}")
    unknown = sorted(set(colours or ()) - set(COLOURS))
    if unknown or (colours is not None and not colours):
        raise ValueError(f"colours must be a non-empty subset of {list(COLOURS)}, got {colours!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic.json").unlink(missing_ok=True)
    for old in [*out.glob("[0-9][0-9][0-9][0-9][0-9].png"), *out.glob("[0-9][0-9][0-9][0-9][0-9].txt")]:
        old.unlink()
    rng = random.Random(seed)
    specs = _drawable(colours)
    # Every combination once, then random ones; a set smaller than that is a random sample of the combinations
    # (the first `count` in palette order would hold only the palette's first colours).
    first = rng.sample(specs, count) if count < len(specs) else specs
    for i in range(count):
        spec = first[i] if i < len(first) else rng.choice(specs)
        render(spec, size, rng).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(spec.caption + "\n", encoding="utf-8")
    heldout = [
        asdict(s) | {"caption": s.caption}
        for s in all_specs(heldout=True)
        if colours is None or s.colour in colours
    ]
    (out / "heldout.json").write_text(json.dumps(heldout, indent=1), encoding="utf-8")
    (out / "synthetic.json").write_text(
        json.dumps(recipe(count=count, size=size, seed=seed, colours=colours)), encoding="utf-8"
    )
    logger.info("wrote %d images of %dpx to %s (%d held-out prompts)", count, size, out, len(heldout))
    return out
