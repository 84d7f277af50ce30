"""GPU benchmark: xut-base, random weights, 1024 x 1024, 28 Euler steps with CFG, bf16, SDPA,
with and without torch.compile. Prints seconds per image and the share of the GPU's peak bf16 FLOP rate.

Run on a GPU machine: `bash bench/gpu.sh` (peak override: PEAK_TFLOPS=989).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.flops import xut_forward_flops

PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
    "RTX 5090": 209.0,
}


def peak_tflops() -> float:
    if "PEAK_TFLOPS" in os.environ:
        return float(os.environ["PEAK_TFLOPS"])
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def main() -> None:
    from hdm_core import PRESETS, XUT, position_map
    from hdm_core.pipeline import sample_latents
    from hdm_core.precision import cast_model
    from hdm_core.sampler import Conditioning

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = PRESETS["xut-base"]
    torch.manual_seed(0)
    model = cast_model(XUT(cfg), torch.bfloat16, dev).eval()  # frequency tensors stay fp32
    h = w = args.size // 8
    pos = position_map(h, w, device=dev)[None]
    addon = torch.zeros(1, device=dev)
    cond = Conditioning(
        torch.randn(1, args.text_tokens, cfg.ctx_dim, device=dev, dtype=torch.bfloat16), pos, addon
    )
    uncond = Conditioning(
        torch.randn(1, args.text_tokens, cfg.ctx_dim, device=dev, dtype=torch.bfloat16), pos, addon
    )
    noise = torch.randn(1, cfg.in_channels, h, w, device=dev)
    flops = 2 * args.steps * xut_forward_flops(cfg, (h // 2) * (w // 2), args.text_tokens)  # cond + uncond
    peak = peak_tflops()
    print(f"device: {torch.cuda.get_device_name()}  peak bf16 {peak} TFLOP/s  torch {torch.__version__}")
    print(
        f"xut-base {args.size}x{args.size}, {args.steps} steps, CFG (batched), {flops / 1e12:.2f} TFLOP/image"
    )
    for compiled in (False, True):
        net = torch.compile(model) if compiled else model
        run = lambda net=net: sample_latents(net, noise, cond, uncond, steps=args.steps, guidance_scale=3.0)  # noqa: E731
        with torch.no_grad():
            run()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        s = min(times)
        print(
            f"compile={compiled!s:<5}  {s:.3f} s/image  {flops / s / 1e12:.1f} TFLOP/s  "
            f"{100 * flops / s / 1e12 / peak:.1f}% of peak  peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
