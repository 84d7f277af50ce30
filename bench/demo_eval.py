"""Score a demo run: does the model draw the prompted colour and shape for captions it never saw?

    python -m bench.demo_eval var/runs/demo [--size 32] [--steps 20] [--cfg 3.0] [--seeds 2] [--sampler euler]
                              [--schedule uniform] [--out FILE]

Method: for every held-out (colour, shape, position, background) prompt of `hdm_demo.shapes` (combinations kept
out of the training set), generate `--seeds` images and score them with the demo kit's scorer
(`hdm_demo.scoring.score`): colour = the palette hue most saturated pixels are nearest to (the backgrounds are
achromatic, so saturated pixels are the shape), shape = the circle/square/triangle template that best overlaps
those pixels. Accuracy = fraction of images
whose colour (shape, both) is the prompted one; chance is 1/6 (1/3, 1/18). A control scores the same images against
a wrong colour (the prompt's colour rotated by one palette step), which must stay near chance.
Writes RUN_DIR/eval.json and RUN_DIR/eval_heldout.png (one row per seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from hdm_core.pipeline import HDMPipeline
from hdm_demo.scoring import score
from hdm_demo.shapes import COLOURS, all_specs

logger = logging.getLogger("demo_eval")


def evaluate(
    run_dir: Path,
    *,
    checkpoint: Path | None,
    size: int,
    steps: int,
    cfg: float,
    seeds: int,
    heldout: bool = True,
    sampler: str = "euler",
    schedule: str | None = None,
) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    ckpt = checkpoint or run_dir / "final.safetensors"
    pipe = HDMPipeline.from_paths(ckpt, config["text_encoder"]["path"])
    specs = all_specs(heldout=heldout)
    rows = []
    t0 = time.perf_counter()
    for s in range(seeds):
        result = pipe.generate(
            [sp.caption for sp in specs],
            width=size,
            height=size,
            steps=steps,
            guidance_scale=cfg,
            seed=1000 * s,
            sampler=sampler,
            schedule=schedule,  # type: ignore[arg-type]
        )
        rows.append(result.images)
    scores = score([img for images in rows for img in images], specs * seeds)
    sheet = Image.new("RGB", (size * len(specs), size * seeds))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            sheet.paste(img, (c * size, r * size))
    sheet.save(run_dir / f"eval_{'heldout' if heldout else 'train'}.png")
    return {
        "checkpoint": str(ckpt),
        "prompts": len(specs),
        "images": scores.images,
        "heldout": heldout,
        "accuracy": scores.colour,
        "shape_accuracy": scores.shape,
        "both_accuracy": scores.both,
        "shape_confusion": scores.shape_confusion,
        "control_wrong_colour_accuracy": scores.control_wrong_colour,
        "chance": 1 / len(COLOURS),
        "predicted_colours": scores.predicted_colours,
        "size": size,
        "steps": steps,
        "sampler": sampler,
        "schedule": schedule,
        "guidance_scale": cfg,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default RUN_DIR/final.safetensors")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-prompts", action="store_true", help="score training prompts instead")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--schedule", default=None, help="default: the sampler's own")
    parser.add_argument("--out", type=Path, default=None, help="default RUN_DIR/eval.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    res = evaluate(
        args.run_dir,
        checkpoint=args.checkpoint,
        size=args.size,
        steps=args.steps,
        cfg=args.cfg,
        seeds=args.seeds,
        heldout=not args.train_prompts,
        sampler=args.sampler,
        schedule=args.schedule,
    )
    (args.out or args.run_dir / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
