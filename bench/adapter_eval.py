"""The adapter learning bench: teach a pretrained model a colour it has never seen, with a LoKr adapter.

    python -m bench.adapter_eval [--out var/adapter-bench] [--colour magenta] [--base-steps N] [--adapter-steps 300]
                                 [--adapter-images 50] [--mix-old 200] [--adapter-lr 0.1] [--factor 4] [--seeds 4]

1. Pretrain the CPU demo recipe (configs/demo-pixel.toml, 2,100 steps, ~8 min on 2 idle cores) on the shapes
   set drawn WITHOUT `--colour`: no image and no caption has it. The base run lives in OUT/base-<key>, key = a
   hash of the recipe (config, data set, text encoder), so a rerun with the same recipe reuses it (and an
   interrupted one resumes).
   `--base-steps N` cuts that run at step N (its snapshot is the base; a busy CPU may not give the whole recipe).
2. Train an adapter (the [adapter] defaults: HDM's LoKr recipe; `--adapter-lr`/`--factor` override them) on
   `--adapter-images` images that have the colour plus `--mix-old` images of the old colours (a second folder of
   the adapter set, drawn with another seed: what the adapter must keep, as DreamBooth's class images). Without the
   old colours (`--mix-old 0`) nothing tells it to keep them, and it draws blue and cyan prompts magenta too
   (docs/training.md). Also cached by its recipe: OUT/adapter-<key>.
3. Score (`hdm_demo.scoring.score`: colour = palette hue of the saturated pixels, shape = best template IoU) for
   `--seeds` seeds: the new colour's prompts whose colour/shape/position combination is held out of both sets
   ("new_heldout") and all of its prompts ("new_all"), base vs base + adapter at weight 1; the old colours' held-out
   prompts, base vs adapter. Also: the adapter file's size / the base file's, and whether weight 0 (and the model
   after the adapter is removed) gives the base model's images bit for bit. Writes OUT/adapter_eval-<key>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.files import load_adapter
from hdm_core.pipeline import HDMPipeline
from hdm_core.train import config_from_dict, run_training
from hdm_demo.assets import ensure_text_encoder
from hdm_demo.scoring import score
from hdm_demo.shapes import COLOURS, ShapeSpec, all_specs, generate_dataset, is_generated, recipe

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("adapter_eval")
SAMPLE_STEPS, GUIDANCE = 20, 3.0


def key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def ensure_set(folder: Path, *, count: int, seed: int, colours: list[str]) -> dict:
    if not is_generated(folder, count=count, seed=seed, colours=colours):
        generate_dataset(folder, count=count, seed=seed, colours=colours)
    return recipe(count=count, size=64, seed=seed, colours=colours)


def train_once(raw: dict, run_dir: Path, final: str, max_steps: int | None = None) -> tuple[Path, float]:
    """Train `raw` into `run_dir` unless its result is there (resuming an interrupted run): (result, seconds).

    `max_steps`: stop the run at that step; the result is then a copy of that step's snapshot (the same run can
    later be continued to its end, or to a later cut)."""
    t0 = time.perf_counter()
    result = run_dir / (final if max_steps is None else f"step-{max_steps:08d}.safetensors")
    if not result.exists():
        resume = (run_dir / "checkpoints").exists()
        run_training(config_from_dict(raw), run_dir, resume=resume, max_steps=max_steps)
        if max_steps is not None:
            shutil.copyfile(run_dir / "checkpoints" / f"step-{max_steps:08d}" / "model.safetensors", result)
    return result, time.perf_counter() - t0


def generate(pipe: HDMPipeline, specs: list[ShapeSpec], seeds: int, size: int) -> list:
    images = []
    for s in range(seeds):
        images += pipe.generate([sp.caption for sp in specs], width=size, height=size, steps=SAMPLE_STEPS,
                                guidance_scale=GUIDANCE, seed=1000 * s).images  # fmt: skip
    return images


def accuracy(images: list, specs: list[ShapeSpec], seeds: int) -> dict:
    sc = score(images, specs * seeds)
    return {"images": sc.images, "colour": sc.colour, "shape": sc.shape, "both": sc.both,
            "predicted_colours": sc.predicted_colours}  # fmt: skip


def identical(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "var" / "adapter-bench")
    p.add_argument("--colour", default="magenta", choices=list(COLOURS))
    p.add_argument("--base-images", type=int, default=2000)
    p.add_argument(
        "--base-steps", type=int, default=None, help="cut the base run at this step (default: all)"
    )
    p.add_argument(
        "--adapter-images", type=int, default=50, help="images of the new colour in the adapter set"
    )
    p.add_argument("--mix-old", type=int, default=200, help="images of the old colours in the adapter set")
    p.add_argument("--adapter-steps", type=int, default=300)
    p.add_argument("--adapter-lr", type=float, default=None, help="default: the recipe's (0.1, muP-scaled)")
    p.add_argument("--factor", type=int, default=None, help="LoKr factor; default: the recipe's (4)")
    p.add_argument("--targets", default=None, help="comma-separated module patterns; default: the recipe's")
    p.add_argument("--no-train-norm", action="store_true", help="leave the blocks' norms frozen")
    p.add_argument("--caption-dropout", type=float, default=None, help="default: the demo recipe's (0.1)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out, new = args.out, args.colour
    old_colours = [c for c in COLOURS if c != new]
    te = out / "toy-te"
    ensure_text_encoder(te)
    te_key = hashlib.sha256((te / "model.safetensors").read_bytes()).hexdigest()
    base_data = out / f"shapes-without-{new}-{args.base_images}"
    base_recipe = ensure_set(base_data, count=args.base_images, seed=0, colours=old_colours)
    raw = tomllib.loads((REPO / "configs" / "demo-pixel.toml").read_text())
    raw["sampling"] = {"every": 0}
    base_key = key({"config": raw, "data": base_recipe, "text_encoder": te_key})
    raw["text_encoder"]["path"], raw["data"]["path"] = str(te), str(base_data)
    base_run = out / f"base-{base_key}"
    base_file, pretrain_s = train_once(raw, base_run, "final.safetensors", args.base_steps)

    ad_data = out / f"adapter-set-{new}-{args.adapter_images}-old{args.mix_old}"
    ad_recipe = [ensure_set(ad_data / new, count=args.adapter_images, seed=1, colours=[new])]
    if args.mix_old:
        ad_recipe.append(ensure_set(ad_data / "old", count=args.mix_old, seed=2, colours=old_colours))
    section = {"trigger_words": [new]} | ({"factor": args.factor} if args.factor else {})
    section |= {"targets": args.targets.split(",")} if args.targets else {}
    section |= {"train_norm": False} if args.no_train_norm else {}
    data = {**raw["data"], "path": str(ad_data)}
    if args.caption_dropout is not None:
        data["captions"] = {**data.get("captions", {}), "caption_dropout": args.caption_dropout}
    stage = {"name": "32px", "resolution": 32, "batch_size": 16, "steps": args.adapter_steps}
    stage |= {"lr": args.adapter_lr} if args.adapter_lr else {}
    ad = {
        k: v for k, v in raw.items() if k not in ("model", "optimizer", "schedule", "stages", "data", "train")
    }
    ad |= {
        "model": {"init_from": str(base_file)},
        "data": data,
        "adapter": section,
        "sampling": {"every": 100, "prompts": [f"a {new} circle at the center on a white background"]},
        "train": {**raw["train"], "checkpoint_every": 100},
        "stages": [stage],
    }
    # The adapter section as validated (its defaults too, e.g. save_dtype), so a changed default is a new run.
    resolved = config_from_dict(ad).adapter
    assert resolved is not None
    recipe_of_run = {"base": [base_key, args.base_steps], "adapter": resolved.model_dump(mode="json")}
    recipe_of_run |= {"stage": stage, "data": ad_recipe}
    if args.caption_dropout is not None:
        recipe_of_run["caption_dropout"] = args.caption_dropout
    ad_key = key(recipe_of_run)
    ad_run = out / f"adapter-{ad_key}"
    adapter_file, adapter_s = train_once(ad, ad_run, "final_adapter.safetensors")
    adapter = load_adapter(adapter_file)

    torch.set_grad_enabled(False)
    pipe = HDMPipeline.from_paths(base_file, te)
    new_all = [s for h in (True, False) for s in all_specs(heldout=h) if s.colour == new]
    new_heldout = [s for s in all_specs(heldout=True) if s.colour == new]
    old = [s for s in all_specs(heldout=True) if s.colour != new]
    sets = {"new_heldout": new_heldout, "new_all": new_all, "old_heldout": old}
    res: dict = {"colour": new, "base_file": str(base_file), "base_steps": args.base_steps or "all", "adapter_run": str(ad_run),
                 "adapter_images": args.adapter_images, "mix_old": args.mix_old,
                 "adapter_steps": args.adapter_steps, "adapter_lr": args.adapter_lr or "recipe (0.1)",
                 "factor": args.factor or "recipe (4)", "seeds": args.seeds, "sample_steps": SAMPLE_STEPS,
                 "guidance_scale": GUIDANCE, "size": args.size,
                 "pretrain_s": pretrain_s, "adapter_train_s": adapter_s}  # fmt: skip
    res |= {"targets": section.get("targets", "recipe"), "train_norm": not args.no_train_norm,
            "caption_dropout": "recipe (0.1)" if args.caption_dropout is None else args.caption_dropout}  # fmt: skip
    t0 = time.perf_counter()
    base_imgs = {k: generate(pipe, v, args.seeds, args.size) for k, v in sets.items()}
    res["base"] = {k: accuracy(base_imgs[k], v, args.seeds) for k, v in sets.items()}
    with apply_adapters(pipe.model, [(adapter, 0.0)]):
        zero = generate(pipe, old, 1, args.size)
    with apply_adapters(pipe.model, [(adapter, 1.0)]):
        res["adapter"] = {k: accuracy(generate(pipe, v, args.seeds, args.size), v, args.seeds)
                          for k, v in sets.items()}  # fmt: skip
    after = generate(pipe, old, 1, args.size)
    res["eval_s"] = time.perf_counter() - t0
    # Same prompts, seeds and batch as the base's first seed: any difference is the adapter's.
    res["weight0_equals_base"] = identical(zero, base_imgs["old_heldout"][: len(old)])
    res["restored_equals_base"] = identical(after, base_imgs["old_heldout"][: len(old)])
    res["adapter_bytes"], res["base_bytes"] = adapter_file.stat().st_size, base_file.stat().st_size
    res["size_ratio"] = res["adapter_bytes"] / res["base_bytes"]
    res["adapter_metadata"] = {
        k: v for k, v in adapter.metadata.items() if k.startswith("hdm_") and "config" not in k
    }
    (out / f"adapter_eval-{ad_key}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
