"""The adapter learning bench: teach a pretrained model a colour it has never seen, with a LoKr adapter.

    python -m bench.adapter_eval [--out var/adapter-bench] [--colour magenta] [--adapter-steps 300] [--seeds 4]

1. Pretrain the CPU demo recipe (configs/demo-pixel.toml, ~5 min on 2 cores) on the shapes set drawn WITHOUT
   `--colour`: no image and no caption has it.
2. Train an adapter (the [adapter] defaults: HDM's LoKr recipe) on `--adapter-images` images that all have it.
3. Score (`hdm_demo.scoring.score`: colour = palette hue of the saturated pixels, shape = best template) for
   `--seeds` seeds: the new colour's prompts whose colour/shape/position combination is held out of both sets
   ("new_heldout") and all of its prompts ("new_all"), base vs base + adapter at weight 1; the old colours' held-out
   prompts, base vs adapter. Also: the adapter file's size / the base file's, and whether weight 0 (and a restored
   model) gives the base model's images bit for bit. Writes OUT/adapter_eval.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from hdm_core.adapter import apply_adapters
from hdm_core.adapter_io import load_adapter
from hdm_core.pipeline import HDMPipeline
from hdm_core.train import config_from_dict, run_training
from hdm_demo.assets import ensure_text_encoder
from hdm_demo.scoring import score
from hdm_demo.shapes import COLOURS, ShapeSpec, all_specs, generate_dataset, is_generated

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("adapter_eval")


def generate(pipe: HDMPipeline, specs: list[ShapeSpec], seeds: int, size: int) -> list:
    images = []
    for s in range(seeds):
        images += pipe.generate([sp.caption for sp in specs], width=size, height=size, steps=20,
                                guidance_scale=3.0, seed=1000 * s).images  # fmt: skip
    return images


def accuracy(images: list, specs: list[ShapeSpec], seeds: int) -> dict:
    sc = score(images, specs * seeds)
    return {"images": sc.images, "colour": sc.colour, "shape": sc.shape, "both": sc.both,
            "predicted_colours": sc.predicted_colours}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "var" / "adapter-bench")
    p.add_argument("--colour", default="magenta", choices=list(COLOURS))
    p.add_argument("--base-images", type=int, default=2000)
    p.add_argument("--adapter-images", type=int, default=100)
    p.add_argument("--adapter-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out, new = args.out, args.colour
    old_colours = [c for c in COLOURS if c != new]
    te = out / "toy-te"
    ensure_text_encoder(te)
    base_data, ad_data = out / "shapes-base", out / "shapes-adapter"
    if not is_generated(base_data, count=args.base_images, colours=old_colours):
        generate_dataset(base_data, count=args.base_images, colours=old_colours)
    if not is_generated(ad_data, count=args.adapter_images, seed=1, colours=[new]):
        generate_dataset(ad_data, count=args.adapter_images, seed=1, colours=[new])
    raw = tomllib.loads((REPO / "configs" / "demo-pixel.toml").read_text())
    raw["text_encoder"]["path"], raw["data"]["path"], raw["sampling"] = str(te), str(base_data), {"every": 0}
    t0 = time.perf_counter()
    base_run = out / "base-run"
    if not (base_run / "final.safetensors").exists():
        run_training(config_from_dict(raw), base_run, resume=(base_run / "checkpoints").exists())
    pretrain_s = time.perf_counter() - t0
    base_file = base_run / "final.safetensors"
    ad = {k: v for k, v in raw.items() if k not in ("model", "optimizer", "schedule", "stages")}
    ad |= {
        "model": {"init_from": str(base_file)},
        "data": {**raw["data"], "path": str(ad_data)},
        "adapter": {"trigger_words": [new]},
        "sampling": {"every": 100, "prompts": [f"a {new} circle at the center on a white background"]},
        "train": {**raw["train"], "checkpoint_every": 100},
        "stages": [{"name": "32px", "resolution": 32, "batch_size": 16, "steps": args.adapter_steps}],
    }
    ad_run = out / f"adapter-run-{args.adapter_steps}"
    t0 = time.perf_counter()
    if not (ad_run / "final_adapter.safetensors").exists():
        run_training(config_from_dict(ad), ad_run, resume=(ad_run / "checkpoints").exists())
    adapter_s = time.perf_counter() - t0
    adapter_file = ad_run / "final_adapter.safetensors"
    adapter = load_adapter(adapter_file)

    torch.set_grad_enabled(False)
    pipe = HDMPipeline.from_paths(base_file, te)
    new_heldout = [s for s in all_specs(heldout=True) if s.colour == new]
    new_all = [s for h in (True, False) for s in all_specs(heldout=h) if s.colour == new]
    old = [s for s in all_specs(heldout=True) if s.colour != new]
    sets = {"new_heldout": new_heldout, "new_all": new_all, "old_heldout": old}
    res: dict = {"colour": new, "adapter_steps": args.adapter_steps, "seeds": args.seeds,
                 "pretrain_s": pretrain_s, "adapter_train_s": adapter_s}  # fmt: skip
    base_imgs = {k: generate(pipe, v, args.seeds, args.size) for k, v in sets.items()}
    res["base"] = {k: accuracy(base_imgs[k], v, args.seeds) for k, v in sets.items()}
    with apply_adapters(pipe.model, [(adapter, 0.0)]):
        zero = generate(pipe, old[:6], 1, args.size)
    with apply_adapters(pipe.model, [(adapter, 1.0)]):
        res["adapter"] = {k: accuracy(generate(pipe, v, args.seeds, args.size), v, args.seeds)
                          for k, v in sets.items()}  # fmt: skip
    after = generate(pipe, old[:6], 1, args.size)
    same = [
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(zero, base_imgs["old_heldout"][:6], strict=True)
    ]
    res["weight0_equals_base"] = all(same)
    res["restored_equals_base"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(after, base_imgs["old_heldout"][:6], strict=True)
    )
    res["adapter_bytes"], res["base_bytes"] = adapter_file.stat().st_size, base_file.stat().st_size
    res["size_ratio"] = res["adapter_bytes"] / res["base_bytes"]
    res["adapter_metadata"] = {
        k: v for k, v in adapter.metadata.items() if k.startswith("hdm_") and "config" not in k
    }
    (out / "adapter_eval.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
