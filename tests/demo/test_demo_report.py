"""The demo's scorer must recognise the ground truth, or its accuracy numbers mean nothing."""

from __future__ import annotations

import random

from PIL import Image

from hdm_demo.scoring import dominant_shape, score_files
from hdm_demo.shapes import all_specs, render
from scripts.demo_report import contact_sheet, loss_curve, pick_prompts


def test_scorer_recognises_rendered_shapes(tmp_path):
    rng = random.Random(0)
    specs = all_specs(heldout=True)
    files = []
    for i, s in enumerate(specs):
        files.append(tmp_path / f"{i}.png")
        render(s, 64, rng).save(files[-1])
    scores = score_files(files, [{"colour": s.colour, "shape": s.shape} for s in specs]).fractions()
    assert scores == {"colour": 1.0, "shape": 1.0, "both": 1.0}
    # A grey image has no shape and no colour: the scorer must not credit it.
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(blank)
    assert score_files([blank], [{"colour": "red", "shape": "square"}]).fractions() == {
        "colour": 0.0,
        "shape": 0.0,
        "both": 0.0,
    }
    assert dominant_shape(Image.open(blank)) is None


def test_prompts_sheet_and_curve(tmp_path):
    import json
    from dataclasses import asdict

    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps([asdict(s) | {"caption": s.caption} for s in all_specs(heldout=True)]))
    prompts = pick_prompts(heldout)
    assert len({p["colour"] for p in prompts}) == 6 and len(prompts) == 12
    assert {p["background"] for p in prompts} == {"white", "gray", "black"}
    assert all(
        len({p["shape"] for p in prompts if p["colour"] == c}) == 2 for c in {p["colour"] for p in prompts}
    )
    assert all(p in json.loads(heldout.read_text()) for p in prompts)
    files = []
    for i, _p in enumerate(prompts[:5]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 64), (200, 0, 0)).save(files[-1])
    sheet = Image.open(contact_sheet(files, [p["caption"] for p in prompts[:5]], tmp_path / "sheet.png"))
    assert sheet.size == (4 * 192, 2 * (192 + 34))
    curve = Image.open(loss_curve([(i, 1.0 / (i + 1)) for i in range(50)], tmp_path / "loss.png"))
    assert curve.size == (640, 360) and len(curve.getcolors(maxcolors=1 << 16)) > 2  # something was drawn
