"""CPU benchmark of hdm_core: forward time, sampling time per image, sampler overhead, peak memory.

Run: `python -m bench.core` (or `make bench`). Each case runs in its own process so peak RSS is its own.
The overhead ratio is sampling_time / (steps x one guided forward), where a guided forward is the batched
cond+uncond pass the sampler makes per Euler step; 1.00 means the sampler adds nothing around the network.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = {
    # name: (preset, pixel size, latent downsample, text tokens, steps, repeats)
    "xut-debug@256": ("xut-debug", 256, 8, 32, 8, 5),
    "xut-base@256": ("xut-base", 256, 8, 32, 4, 2),
}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str) -> dict:
    from hdm_core import PRESETS, XUT, position_map
    from hdm_core.pipeline import sample_latents
    from hdm_core.sampler import Conditioning

    preset, px, down, n_txt, steps, repeats = CASES[name]
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = XUT(cfg).eval()
    h = w = px // down
    pos = position_map(h, w)[None]
    addon = torch.zeros(1)
    cond = Conditioning(torch.randn(1, n_txt, cfg.ctx_dim), pos, addon)
    uncond = Conditioning(torch.randn(1, n_txt, cfg.ctx_dim), pos, addon)
    noise = torch.randn(1, cfg.in_channels, h, w)
    x2, t2 = noise.repeat(2, 1, 1, 1), torch.full((2,), 0.5)
    ctx2, pos2, addon2 = torch.cat([cond.ctx, uncond.ctx]), pos.expand(2, -1, -1), addon.repeat(2)

    with torch.no_grad():
        fwd = _timed(lambda: model(x2, t2, ctx2, pos_map=pos2, addon_info=addon2), repeats)
        smp = _timed(
            lambda: sample_latents(model, noise, cond, uncond, steps=steps, guidance_scale=3.0), repeats
        )
    return {
        "case": name,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": (h // 2) * (w // 2) + n_txt,
        "steps": steps,
        "guided_forward_s": fwd,
        "sample_s_per_image": smp,
        "overhead_ratio": smp / (steps * fwd),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process (internal)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    print(
        f"{'case':<16}{'params':>13}{'tokens':>8}{'steps':>6}{'fwd(cfg) s':>12}{'sample s/img':>14}"
        f"{'overhead':>10}{'peak MiB':>10}"
    )
    for name in CASES:
        out = subprocess.run(
            [sys.executable, "-m", "bench.core", "--case", name], check=True, capture_output=True, text=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{r['case']:<16}{r['params']:>13,}{r['tokens']:>8}{r['steps']:>6}{r['guided_forward_s']:>12.4f}"
            f"{r['sample_s_per_image']:>14.4f}{r['overhead_ratio']:>10.3f}{r['peak_rss_mib']:>10.0f}"
        )


if __name__ == "__main__":
    main()
