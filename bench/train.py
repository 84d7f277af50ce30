"""Training benchmarks: step time with TREAD on/off, data loading throughput, GPU max batch / images per second.

    python -m bench.train step  [--preset xut-pixel-debug] [--res 32] [--batch 16] [--steps 8] [--threads 2]
    python -m bench.train data  [--res 64] [--src-size 512] [--images 256] [--workers 1 2]
    python -m bench.train gpu   --preset xut-base --res 256 --precision bf16 --tread 0.5 [--batch auto] [--grad-ckpt]

`step` times one full optimizer step (forward, backward, AdamW) on random inputs with TREAD rate 0 and 0.5 at the
same resolution and batch (so the same number of input tokens), and prints the measured ratio next to the
theoretical forward-FLOP ratio. `data` measures decoding + shifted square crop + caption processing in DataLoader
workers. `gpu` is for a CUDA machine (bench/gpu_train.sh): it finds the largest batch that fits and reports
images/s. Everything prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.flops import xut_forward_flops
from hdm_core import PRESETS, XUT, XUTConfig
from hdm_core.data import CaptionedImageDataset, StageSampler, StreamLayout, make_loader
from hdm_core.data.captions import CaptionConfig
from hdm_core.flow import flow_loss
from hdm_core.train.config import OptimizerSection
from hdm_core.train.optim import build_optimizer


def _inputs(cfg: XUTConfig, batch: int, latent: int, ctx_len: int, device: torch.device) -> tuple:
    x0 = torch.randn(batch, cfg.in_channels, latent, latent, device=device)
    ctx = torch.randn(batch, ctx_len, cfg.ctx_dim, device=device)
    return x0, ctx


def time_steps(
    model: XUT,
    opt: torch.optim.Optimizer,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    rate: float,
    steps: int,
    amp: torch.dtype | None,
    *,
    warmup: int = 2,
) -> list[float]:
    device = x0.device
    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = flow_loss(model, x0, ctx, tread_rate=rate)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def cmd_step(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    if args.patch:
        cfg = cfg.replace(patch_size=args.patch)
    device = torch.device(args.device)
    model = XUT(cfg).to(device).train()
    opt = build_optimizer(model, OptimizerSection())
    latent = args.res // args.downsample
    x0, ctx = _inputs(cfg, args.batch, latent, args.ctx, device)
    n_img = (latent // cfg.patch_size) ** 2
    # Interleave the two rates step by step so that load from other processes biases neither.
    times: dict[float, list[float]] = {0.0: [], 0.5: []}
    for rate in (0.0, 0.5):
        time_steps(model, opt, x0, ctx, rate, 0, None)  # warm-up
    for _ in range(args.steps):
        for rate in (0.0, 0.5):
            times[rate] += time_steps(model, opt, x0, ctx, rate, 1, None, warmup=0)
    results = {rate: statistics.median(t) for rate, t in times.items()}
    for rate, t in times.items():
        print(
            json.dumps(
                {
                    "bench": "train_step",
                    "preset": args.preset,
                    "patch": cfg.patch_size,
                    "res": args.res,
                    "batch": args.batch,
                    "image_tokens": n_img,
                    "text_tokens": args.ctx,
                    "tread_rate": rate,
                    "threads": args.threads,
                    "median_step_s": round(results[rate], 4),
                    "min_step_s": round(min(t), 4),
                    "images_per_s": round(args.batch / results[rate], 2),
                }
            )
        )
    theory = xut_forward_flops(cfg, n_img, args.ctx, 0.5) / xut_forward_flops(cfg, n_img, args.ctx, 0.0)
    print(
        json.dumps(
            {
                "bench": "tread_ratio",
                "measured_step_time_ratio_0.5_over_0": round(results[0.5] / results[0.0], 3),
                "min_step_time_ratio_0.5_over_0": round(min(times[0.5]) / min(times[0.0]), 3),
                "theoretical_flop_ratio": round(theory, 3),
                "image_tokens": n_img,
                "text_tokens": args.ctx,
            }
        )
    )


def cmd_data(args: argparse.Namespace) -> None:
    from PIL import Image

    from hdm_demo.shapes import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "shapes", count=args.images, size=args.src_size)
        if args.jpeg:  # re-encode as JPEG, wider than tall, to exercise decode + resize + shifted crop
            for png in root.glob("*.png"):
                img = Image.open(png).resize((args.src_size * 3 // 2, args.src_size))
                img.save(png.with_suffix(".jpg"), quality=90)
                png.unlink()
        ds = CaptionedImageDataset(root, size=args.res, captions=CaptionConfig())
        for workers in args.workers:
            layout = StreamLayout(args.batch, 1, 1)
            loader = make_loader(
                ds, StageSampler(len(ds), layout, rank=0, seed=0, stage=0), num_workers=workers
            )
            it = iter(loader)
            next(it)  # worker start-up excluded
            n_batches = max(1, args.images // args.batch)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                next(it)
            dt = time.perf_counter() - t0
            ips = n_batches * args.batch / dt
            print(
                json.dumps(
                    {
                        "bench": "data_loading",
                        "workers": workers,
                        "src": f"{'jpeg' if args.jpeg else 'png'} "
                        f"{args.src_size * (3 if args.jpeg else 2) // 2}x{args.src_size}",
                        "crop": args.res,
                        "images_per_s": round(ips, 1),
                        "images_per_s_per_worker": round(ips / max(workers, 1), 1),
                    }
                )
            )
            del it, loader


def _fits(
    cfg: XUTConfig,
    batch: int,
    latent: int,
    ctx_len: int,
    rate: float,
    amp: torch.dtype | None,
    grad_ckpt: bool,
) -> float | None:
    """Median step time for `batch`, or None if it runs out of memory."""
    model = opt = None
    try:
        model = XUT(cfg).cuda().train()
        model.set_gradient_checkpointing(grad_ckpt)
        opt = build_optimizer(model, OptimizerSection())
        x0, ctx = _inputs(cfg, batch, latent, ctx_len, torch.device("cuda"))
        return statistics.median(time_steps(model, opt, x0, ctx, rate, 3, amp))
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, opt
        torch.cuda.empty_cache()


def cmd_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the gpu benchmark needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = PRESETS[args.preset]
    latent = args.res // 8  # VAE downsample 8 (spec §5); the VAE and text encoder are excluded here
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    if args.batch == "auto":  # double until out of memory, then bisect
        lo, hi = 0, 8
        while _fits(cfg, hi, latent, args.ctx, args.tread, amp, args.grad_ckpt) is not None and hi < 4096:
            lo, hi = hi, hi * 2
        while hi - lo > max(1, lo // 16):
            mid = (lo + hi) // 2
            lo, hi = (
                (mid, hi) if _fits(cfg, mid, latent, args.ctx, args.tread, amp, args.grad_ckpt) else (lo, mid)
            )
        batch = lo
    else:
        batch = int(args.batch)
    if batch < 1:
        raise SystemExit("not even a batch of 8 fits")
    torch.cuda.reset_peak_memory_stats()
    step = _fits(cfg, batch, latent, args.ctx, args.tread, amp, args.grad_ckpt)
    assert step is not None
    n_img = (latent // cfg.patch_size) ** 2
    fl = 3 * xut_forward_flops(cfg, n_img, args.ctx, args.tread) * batch  # fwd + bwd ~ 3x fwd
    print(
        json.dumps(
            {
                "bench": "gpu_train",
                "gpu": torch.cuda.get_device_name(),
                "preset": args.preset,
                "res": args.res,
                "precision": args.precision,
                "tread_rate": args.tread,
                "grad_ckpt": args.grad_ckpt,
                "max_batch": batch,
                "step_s": round(step, 4),
                "images_per_s": round(batch / step, 1),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "model_tflops": round(fl / step / 1e12, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step")
    p.add_argument("--preset", default="xut-pixel-debug")
    p.add_argument("--patch", type=int, default=0, help="override patch_size")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--downsample", type=int, default=1, help="codec downsample (1 = pixel space)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=16, help="text tokens")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    d = sub.add_parser("data")
    d.add_argument("--res", type=int, default=64)
    d.add_argument("--src-size", type=int, default=512)
    d.add_argument("--images", type=int, default=256)
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--jpeg", action="store_true", help="JPEG sources, 3:2 aspect")
    d.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    g = sub.add_parser("gpu")
    g.add_argument("--preset", default="xut-base")
    g.add_argument("--res", type=int, default=256)
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    g.add_argument("--tread", type=float, default=0.5)
    g.add_argument("--ctx", type=int, default=256)
    g.add_argument("--batch", default="auto")
    g.add_argument("--grad-ckpt", action="store_true")
    args = parser.parse_args()
    if not math.isfinite(getattr(args, "tread", 0.0)):
        raise SystemExit("--tread must be finite")
    {"step": cmd_step, "data": cmd_data, "gpu": cmd_gpu}[args.cmd](args)


if __name__ == "__main__":
    main()
