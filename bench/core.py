"""CPU benchmark of hdm_core, every number measured in this one run (`make bench` = `python -m bench.core`).

1. XUT forward and train step (flow loss + backward + AdamW), today's tree vs commit 14e55da (the commit before
   issue 11), at 256 image + 64 text tokens, batch 2: each version runs in its own process with its own PYTHONPATH
   (the old one from `git archive`), alternating old/new for several rounds; medians, ratio = old / new.
2. Sampler overhead = sampling time / (steps x one guided forward), per repeat; min / median / max and IQR.
3. Pipeline level: 8 queued image jobs (same size, steps, sampler, guidance; different prompts and seeds) as one
   `generate_batch` vs eight `generate` calls: images/s of each and their ratio.
The CPU may be shared: numbers are medians of repeats, and both versions see the same conditions per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_COMMIT = "14e55da"
CORE_CASES = {
    # name: XUTConfig fields (everything else default); 32x32 latent, patch 2 -> 256 image tokens; 64 text tokens.
    "dim256": dict(
        dim=256,
        heads=4,
        head_dim=64,
        mlp_dim=768,
        ctx_dim=256,
        ctx_size=64,
        depth=2,
        enc_blocks=1,
        dec_blocks=2,
        tread_pre=1,
        tread_post=1,
    ),
    "xut-debug": None,
}


def _median_time(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def core_case(name: str, repeats: int) -> dict:
    """Runs against whichever hdm_core is on PYTHONPATH (today's or 14e55da's): only APIs both have."""
    import hdm_core
    from hdm_core import PRESETS, XUT, XUTConfig
    from hdm_core.flow import flow_loss

    fields = CORE_CASES[name]
    cfg = PRESETS["xut-debug"] if fields is None else XUTConfig(**fields)
    torch.manual_seed(0)
    model = XUT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 32, 32, generator=g)
    ctx, t, addon = torch.randn(2, 64, cfg.ctx_dim, generator=g), torch.tensor([0.3, 0.7]), torch.zeros(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x, t, ctx, addon_info=addon)

    def train_step() -> None:
        model.train()  # routes at the config's TREAD rate (0.5), as training does
        opt.zero_grad(set_to_none=True)
        flow_loss(
            model,
            x,
            ctx,
            addon_info=addon,
            generator=torch.Generator().manual_seed(1),
            route_generators=[torch.Generator().manual_seed(i) for i in range(2)],
        ).backward()
        opt.step()

    return {
        "hdm_core": str(Path(hdm_core.__file__).parent),
        "forward_s": _median_time(forward, repeats),
        "train_step_s": _median_time(train_step, repeats),
        "threads": torch.get_num_threads(),
    }


def sampler_overhead(repeats: int) -> dict:
    from hdm_core import PRESETS, XUT, position_map
    from hdm_core.pipeline import sample_latents
    from hdm_core.sampler import Conditioning

    cfg, steps = PRESETS["xut-debug"], 8
    torch.manual_seed(0)
    model = XUT(cfg).eval()
    pos, addon = position_map(32, 32)[None], torch.zeros(1)
    cond = Conditioning(torch.randn(1, 64, cfg.ctx_dim), pos, addon)
    uncond = Conditioning(torch.randn(1, 64, cfg.ctx_dim), pos, addon)
    noise = torch.randn(1, cfg.in_channels, 32, 32)
    x2, t2 = noise.repeat(2, 1, 1, 1), torch.full((2,), 0.5)
    ctx2, pos2, addon2 = torch.cat([cond.ctx, uncond.ctx]), torch.cat([pos, pos]), addon.repeat(2)
    ratios = []
    with torch.no_grad():
        for _ in range(repeats):  # forward and sampling measured back to back, so both see the same load
            fwd = statistics.median(
                _median_time(lambda: model(x2, t2, ctx2, pos_map=pos2, addon_info=addon2), 5, warmup=1)
            )
            smp = _median_time(
                lambda: sample_latents(model, noise, cond, uncond, steps=steps, guidance_scale=3.0),
                1,
                warmup=1,
            )[0]
            ratios.append(smp / (steps * fwd))
    q = statistics.quantiles(ratios, n=4)
    return {
        "steps": steps,
        "ratios": ratios,
        "min": min(ratios),
        "median": statistics.median(ratios),
        "max": max(ratios),
        "iqr": q[2] - q[0],
    }


def batched_vs_sequential(rounds: int) -> dict:
    from hdm_core import PRESETS, XUT
    from hdm_core.batching import ImageJob
    from hdm_core.codec import PixelCodec
    from hdm_core.pipeline import HDMPipeline
    from hdm_core.text import TextEncoder
    from hdm_demo.text_encoder import build_toy_text_encoder

    with tempfile.TemporaryDirectory() as tmp:
        te = TextEncoder.from_pretrained(build_toy_text_encoder(Path(tmp) / "te", hidden_size=64))
    torch.manual_seed(0)
    pipe = HDMPipeline(XUT(PRESETS["xut-pixel-debug"]), PixelCodec(), te)
    prompts = ["a red circle", "a big square", "a blue square", "a red square"]  # equal token counts
    jobs = [ImageJob(prompts[i % 4], seed=100 + i, negative_prompt="noisy") for i in range(8)]
    kw = dict(width=32, height=32, steps=8, guidance_scale=3.0)
    seq, bat = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for j in jobs:
            pipe.generate(j.prompt, negative_prompt=j.negative_prompt, seed=j.seed, **kw)
        seq.append(len(jobs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pipe.generate_batch(jobs, **kw)
        bat.append(len(jobs) / (time.perf_counter() - t0))
    s, b = statistics.median(seq), statistics.median(bat)
    return {
        "jobs": len(jobs),
        "size": "32x32 px xut-pixel-debug",
        "steps": 8,
        "sequential_img_s": s,
        "batched_img_s": b,
        "ratio": b / s,
    }


def _child(args: list[str], pythonpath: str, threads: int) -> dict:
    # `python -m` puts the working directory first on sys.path: run from the first PYTHONPATH entry.
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-m", "bench.core", *args, "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath.split(os.pathsep)[0],
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _extract_base(dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", BASE_COMMIT, "hdm_core"], check=True, capture_output=True, cwd=ROOT
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=["core", "sampler", "batch"], help="internal: one measurement")
    parser.add_argument("--case", choices=sorted(CORE_CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating old/new processes per case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per measuring process (1: a shared CPU oversubscribes OpenMP teams)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "core":
        print(json.dumps(core_case(args.case, args.repeats)))
        return
    if args.worker == "sampler":
        print(json.dumps(sampler_overhead(args.repeats)))
        return
    if args.worker == "batch":
        print(json.dumps(batched_vs_sequential(args.repeats)))
        return

    results: dict = {"base_commit": BASE_COMMIT, "core": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = _extract_base(Path(tmp))
        paths = {"old": f"{base}{os.pathsep}{ROOT}", "new": str(ROOT)}
        print(
            f"{'case':<11}{'':<6}{'old s':>10}{'new s':>10}{'old/new':>9}   (medians over {args.rounds} rounds "
            f"x {args.repeats} repeats, batch 2, 256 image + 64 text tokens, {args.threads} thread(s))"
        )
        for case in CORE_CASES:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(args.rounds):
                for which in ("old", "new"):
                    r = _child(
                        ["--worker", "core", "--case", case, "--repeats", str(args.repeats)],
                        paths[which],
                        args.threads,
                    )
                    if which == "old" and not r["hdm_core"].startswith(str(base)):
                        raise RuntimeError(f"the base run imported {r['hdm_core']}, not the extracted {base}")
                    runs[which].append(r)
            row = {}
            for metric in ("forward_s", "train_step_s"):
                old = statistics.median(t for r in runs["old"] for t in r[metric])
                new = statistics.median(t for r in runs["new"] for t in r[metric])
                row[metric] = {"old": old, "new": new, "ratio": old / new}
                print(f"{case:<11}{metric[:-2]:<6}{old:>10.4f}{new:>10.4f}{old / new:>8.2f}x")
            results["core"][case] = row
    smp = _child(["--worker", "sampler", "--repeats", "9"], str(ROOT), args.threads)
    results["sampler_overhead"] = smp
    print(
        f"sampler overhead (xut-debug, {smp['steps']} Euler steps, CFG): min {smp['min']:.3f}  median "
        f"{smp['median']:.3f}  max {smp['max']:.3f}  IQR {smp['iqr']:.3f}  ({len(smp['ratios'])} repeats)"
    )
    bat = _child(["--worker", "batch", "--repeats", "3"], str(ROOT), args.threads)
    results["pipeline_batching"] = bat
    print(
        f"pipeline batching, {bat['jobs']} queued jobs ({bat['size']}, {bat['steps']} steps, CFG): sequential "
        f"{bat['sequential_img_s']:.2f} img/s, generate_batch {bat['batched_img_s']:.2f} img/s, "
        f"ratio {bat['ratio']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
