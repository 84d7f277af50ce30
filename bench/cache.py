"""Training caches on CPU: step time without caches vs a second run that reads them (nothing left to build).

    python -m bench.cache [--steps 20] [--images 64]

A tiny real diffusers AutoencoderKL (3 blocks, 32-64-64 channels) at 64 px, the demo's toy text encoder, a tiny
XUT; three runs on the same data: no cache, cache built (first job), cache reused (second job). Prints the median
step time of each and the ratio, and whether the loss sequences match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from hdm_core.train import config_from_dict, run_training
from hdm_demo.shapes import generate_dataset
from hdm_demo.text_encoder import build_toy_text_encoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    data = generate_dataset(root / "data", count=args.images, size=64)
    te = build_toy_text_encoder(root / "te", hidden_size=64, num_layers=2)
    torch.manual_seed(0)
    AutoencoderKL(
        latent_channels=4, block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=16,
    ).save_pretrained(root / "vae")  # fmt: skip

    def run(name: str, cache: dict) -> list[dict]:
        cfg = config_from_dict({
            "seed": 1, "model": {"preset": "xut-pixel-debug", "overrides": {"in_channels": 4}},
            "text_encoder": {"path": str(te), "max_length": 16}, "codec": {"kind": "vae", "path": str(root / "vae")},
            "data": {"path": str(data), "num_workers": 0}, "cache": cache,
            "train": {"checkpoint_every": 10_000, "num_threads": 1},
            "stages": [{"resolution": 64, "batch_size": 8, "lr": 0.5, "steps": args.steps}],
        })  # fmt: skip
        run_training(cfg, root / name)
        return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]

    cache = {"latents": True, "text": True, "dir": str(root / "cache")}
    plain, first, second = run("plain", {}), run("first", cache), run("second", cache)
    step = {n: statistics.median(r["step_time_s"] for r in log if "loss" in r)
            for n, log in (("no cache", plain), ("cache (first job)", first), ("cache (second job)", second))}  # fmt: skip
    built = [r for r in second if r.get("kind") == "cache"]
    same = [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in second if "loss" in r]
    diff = max(
        abs(a["loss"] - b["loss"]) for a, b in zip(plain, [r for r in second if "loss" in r], strict=True)
    )
    out = {"median_step_s": step, "ratio_no_cache_over_cached": step["no cache"] / step["cache (second job)"],
           "second_job_build_records": len(built), "losses_identical": same, "max_loss_diff": diff}  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
