"""Score inpainting with the demo model: does a prompted shape appear, in the prompted colour, in the masked corner?

    python -m bench.edit_eval RUN_DIR_OR_CHECKPOINT [--size 32] [--steps 20] [--cfg 3.0] [--seeds 2]
        [--mask box|quadrant] [--strength 1.0] [--mask-blur 0]

Method: for each corner position of `hdm_demo.shapes` (top left, top right, bottom left, bottom right) and each
background, two start images: `background` (the plain background) and `replace` (a shape of another colour already
drawn at that position by `hdm_demo.shapes.render`). The mask covers the corner where the position puts the shape:
`box` (default) = the corner square the position's shape can occupy (centre 0.32 + half size 0.29 + jitter 0.03 =
0.64 of the side; the demo's shapes are about half the image wide, so an exact quadrant would clip them), `quadrant` =
exactly a quarter of the image. Every (colour, shape) is prompted as "a {colour} {shape} at the {position} on a
{background} background" (the `replace` start's own colour left out) and inpainted (`HDMPipeline.generate(...,
edit=EditSpec(...))`). The masked region is cropped and scored with the demo kit's scorer (`hdm_demo.scoring.score`:
colour = the palette hue most saturated pixels are nearest to, shape = the best-fitting circle/square/triangle
template); chance is 1/6 (colour), 1/3 (shape), 1/18 (both); a control scores against a wrong colour. Unmasked pixels:
the number that differ from the start image (must be 0). Writes edit_eval.json and edit_eval.png (row pairs: start
image, result) next to the checkpoint's run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdm_core.edit import EditSpec
from hdm_core.pipeline import HDMPipeline
from hdm_demo.scoring import score
from hdm_demo.shapes import BACKGROUNDS, COLOURS, HALF_SIZE, JITTER, POSITIONS, SHAPES, ShapeSpec, render

logger = logging.getLogger("edit_eval")
CORNERS = [p for p in POSITIONS if p[0] != "center"]


def resolve(path: Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) from a run folder or a checkpoint file / folder inside one."""
    if path.is_dir() and (path / "config.json").is_file():
        final = path / "final.safetensors"
        if final.is_file():
            return final, path
        steps = sorted((path / "checkpoints").glob("step-*/model.safetensors"))
        if not steps:
            raise SystemExit(f"{path} has no final.safetensors and no checkpoints/step-*/model.safetensors")
        return steps[-1], path
    ckpt = path / "model.safetensors" if path.is_dir() else path
    run = next((p for p in ckpt.parents if (p / "config.json").is_file()), None)
    if run is None:
        raise SystemExit(f"no run folder (config.json) above {ckpt}")
    return ckpt, run


def corner_mask(position: str, size: int, kind: str) -> Image.Image:
    _, cy, cx = next(p for p in POSITIONS if p[0] == position)
    side = size // 2 if kind == "quadrant" else round(size * (0.32 + HALF_SIZE[1] + JITTER))
    y0 = 0 if cy < 0.5 else size - side
    x0 = 0 if cx < 0.5 else size - side
    mask = np.zeros((size, size), np.uint8)
    mask[y0 : y0 + side, x0 : x0 + side] = 255
    return Image.fromarray(mask, "L")


def evaluate(
    ckpt: Path,
    run_dir: Path,
    *,
    size: int,
    steps: int,
    cfg: float,
    seeds: int,
    mask_kind: str,
    strength: float,
    mask_blur: float,
) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    pipe = HDMPipeline.from_paths(ckpt, config["text_encoder"]["path"])
    rng = random.Random(0)
    results: dict[str, dict] = {}
    sheet_rows: list[list[Image.Image]] = []
    t0 = time.perf_counter()
    for mode in ("background", "replace"):
        crops, specs, changed, unmasked = [], [], 0, 0
        for pi, (position, _, _) in enumerate(CORNERS):
            for bi, background in enumerate(BACKGROUNDS):
                start_colour = list(COLOURS)[(pi + 2 * bi) % len(COLOURS)]
                if mode == "background":
                    start = Image.new("RGB", (size, size), BACKGROUNDS[background])
                else:
                    other = ShapeSpec(start_colour, SHAPES[(pi + bi) % len(SHAPES)], position, background)
                    start = render(other, size, rng)
                batch = [
                    ShapeSpec(c, s, position, background)
                    for c in COLOURS
                    for s in SHAPES
                    if mode == "background" or c != start_colour
                ]
                mask = corner_mask(position, size, mask_kind)
                box = Image.fromarray(np.asarray(mask)).getbbox()
                keep = np.asarray(mask) == 0
                for seed in range(seeds):
                    result = pipe.generate(
                        [sp.caption for sp in batch],
                        width=size,
                        height=size,
                        steps=steps,
                        guidance_scale=cfg,
                        seed=1000 * seed + 100 * pi + 10 * bi,
                        edit=EditSpec(start, strength=strength, mask=mask, mask_blur=mask_blur),
                    )
                    for img in result.images:
                        out = np.asarray(img)
                        changed += int((out[keep] != np.asarray(start)[keep]).any(axis=-1).sum())
                        unmasked += int(keep.sum())
                        crops.append(img.crop(box))
                    specs += batch
                    if seed == 0:
                        sheet_rows.append([start, *result.images])
        s = score(crops, specs)
        results[mode] = {
            "images": s.images,
            "colour_accuracy": s.colour,
            "shape_accuracy": s.shape,
            "both_accuracy": s.both,
            "control_wrong_colour_accuracy": s.control_wrong_colour,
            "shape_confusion": s.shape_confusion,
            "unmasked_pixels_changed": changed,
            "unmasked_pixels_checked": unmasked,
        }
        logger.info("%s: %s", mode, {k: v for k, v in results[mode].items() if k != "shape_confusion"})
    width = max(len(r) for r in sheet_rows)
    sheet = Image.new("RGB", (size * width, size * len(sheet_rows)), (0, 0, 0))
    for r, row in enumerate(sheet_rows):
        for c, img in enumerate(row):
            sheet.paste(img, (c * size, r * size))
    sheet.save(run_dir / "edit_eval.png")
    return {
        "checkpoint": str(ckpt),
        "method": "inpaint a corner mask, score the masked crop with hdm_demo.scoring (see bench/edit_eval.py)",
        "mask": mask_kind,
        "strength": strength,
        "mask_blur": mask_blur,
        "size": size,
        "steps": steps,
        "guidance_scale": cfg,
        "seeds": seeds,
        "chance": {
            "colour": 1 / len(COLOURS),
            "shape": 1 / len(SHAPES),
            "both": 1 / (len(COLOURS) * len(SHAPES)),
        },
        **results,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run folder, or a checkpoint file/folder inside one")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--mask", choices=["box", "quadrant"], default="box")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--mask-blur", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    ckpt, run_dir = resolve(args.path)
    res = evaluate(
        ckpt,
        run_dir,
        size=args.size,
        steps=args.steps,
        cfg=args.cfg,
        seeds=args.seeds,
        mask_kind=args.mask,
        strength=args.strength,
        mask_blur=args.mask_blur,
    )
    (run_dir / "edit_eval.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
