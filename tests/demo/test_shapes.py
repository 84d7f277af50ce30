"""The synthetic shapes set and the scorer's building blocks (hdm_demo): recipe, held-out split, colour/shape
recognition of the set's own images, the assets CLI."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from hdm_demo.scoring import dominant_colour, dominant_shape, shape_scores
from hdm_demo.shapes import COLOURS, all_specs, generate_dataset, is_generated, is_heldout, render


def test_synthetic_dataset_and_colour_metric(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "syn", count=40, size=48, seed=3)
    images = sorted(out.glob("*.png"))
    assert len(images) == 40
    heldout = {s.caption for s in all_specs(heldout=True)}
    correct = 0
    for path in images:
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption not in heldout
        words = caption.split()
        colour, shape, position = words[1], words[2], " ".join(words[5:-4])
        assert colour in COLOURS and not is_heldout(colour, shape, position)
        correct += dominant_colour(Image.open(path)) == colour
    assert correct == 40
    # The recipe is recorded: the same call is recognised as done, another recipe is not, and regenerating
    # replaces the earlier images instead of mixing the two sets.
    assert is_generated(out, count=40, size=48, seed=3)
    assert not is_generated(out, count=40, size=48, seed=4) and not is_generated(tmp_path / "none", count=40)
    generate_dataset(out, count=10, size=48, seed=4)
    assert len(list(out.glob("*.png"))) == 10 and is_generated(out, count=10, size=48, seed=4)
    # A set smaller than the number of combinations is a sample over the whole palette, not its first colours;
    # one of every combination holds each once.
    small = generate_dataset(tmp_path / "small", count=30, size=16, seed=5, colours=["red", "cyan", "blue"])
    drawn = [p.read_text().split()[1] for p in sorted(small.glob("*.txt"))]
    assert set(drawn) == {"red", "cyan", "blue"} and max(drawn.count(c) for c in set(drawn)) < 20, drawn
    specs = [s for s in all_specs(heldout=False) if s.colour == "green"]
    full = generate_dataset(tmp_path / "full", count=len(specs), size=16, seed=5, colours=["green"])
    assert sorted(p.read_text().strip() for p in full.glob("*.txt")) == sorted(s.caption for s in specs)
    # An achromatic image has no dominant colour; a wrong hue is not accepted.
    assert dominant_colour(Image.new("RGB", (32, 32), (128, 128, 128))) is None
    assert dominant_colour(Image.new("RGB", (32, 32), COLOURS["blue"])) == "blue"


@pytest.mark.parametrize("size", [32, 64])
def test_shape_metric_recognises_every_rendered_shape(size: int) -> None:
    """The demo's shape score is only meaningful if it names the drawn shape, also blurred and downscaled."""
    from PIL import ImageFilter

    rng = random.Random(size)
    for spec in all_specs(heldout=False)[::3] + all_specs(heldout=True):
        img = render(spec, 64, rng).resize((size, size), Image.Resampling.BICUBIC)
        blurred = img.filter(ImageFilter.GaussianBlur(size / 32))
        for candidate in (img, blurred):
            assert dominant_shape(candidate) == spec.shape, (spec, shape_scores(candidate))
    # No saturated pixels: no shape; a square patch is a square, not a circle.
    assert dominant_shape(Image.new("RGB", (32, 32), (240, 240, 240))) is None
    square = Image.new("RGB", (32, 32), (15, 15, 15))
    square.paste(COLOURS["red"], (8, 8, 22, 22))
    assert dominant_shape(square) == "square"


def test_assets_cli(tmp_path: Path) -> None:
    from hdm_demo.assets import main

    assert main(["--data", str(tmp_path / "out"), "--count", "5", "--size", "24"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 5
    assert Image.open(tmp_path / "out" / "00000.png").size == (24, 24)
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "bad"), "--count", "0"])
    with pytest.raises(SystemExit):
        main([])  # nothing to build
