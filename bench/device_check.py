"""One prepared device check (bench/device_check.sh): every step in its own time-bounded subprocess; a failed or
timed-out step is recorded in the JSON and the next one runs. `--device cpu --quick` runs the same code, small.

Steps: env, parity (bf16 vs fp32 forward + sampling on the device), sampler (device latents vs CPU fp32), train_step
(3 steps of the real trainer, `python -m hdm_core.train`, under its default precision), ddp (2 ranks: NCCL with 2
GPUs, gloo on CPU), infer (s/img, eager and compiled), train_mfu (img/s and MFU of the real trainer at 256 px, TREAD
0.5), worker (embedded `hdm serve`, one image job over HTTP on the device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _model(preset: str, dev: torch.device, dtype: torch.dtype = torch.float32):
    from hdm_core import PRESETS, XUT
    from hdm_core.precision import cast_model

    torch.manual_seed(0)
    model = XUT(PRESETS[preset])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return cast_model(model, dtype, dev).eval()


def _inputs(cfg, dev, b: int, hw: int, t_tokens: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg.in_channels, hw, hw, generator=g).to(dev)
    ctx = torch.randn(b, t_tokens, cfg.ctx_dim, generator=g).to(dev)
    return x, ctx


def step_env(a) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        out["name"] = torch.cuda.get_device_name(0)
    return out | {"ok": True}


def step_parity(a) -> dict:
    from hdm_core.pipeline import sample_latents
    from hdm_core.rope import position_map
    from hdm_core.sampler import Conditioning

    dev, preset = torch.device(a.device), "xut-debug" if a.quick else "xut-small"
    ref, low = _model(preset, dev), _model(preset, dev, torch.bfloat16)
    x, ctx = _inputs(ref.config, dev, 2, 32, 64)
    t = torch.tensor([0.3, 0.9], device=dev)
    with torch.no_grad():
        r, o = ref(x, t, ctx), low(x.bfloat16(), t, ctx.bfloat16())
    fwd = ((o.float() - r).abs().max() / r.abs().max()).item()
    pos = position_map(32, 32, device=dev)[None].expand(2, -1, -1)
    u = torch.zeros_like(ctx)
    lat_r = sample_latents(ref, x, Conditioning(ctx, pos), Conditioning(u, pos), steps=4, guidance_scale=3.0)
    lat_l = sample_latents(
        low,
        x,
        Conditioning(ctx.bfloat16(), pos),
        Conditioning(u.bfloat16(), pos),
        steps=4,
        guidance_scale=3.0,
    )
    smp = ((lat_l - lat_r).abs().max() / lat_r.abs().max()).item()
    return {"preset": preset, "bf16_fwd_rel": fwd, "bf16_sample_rel": smp, "ok": fwd < 0.06 and smp < 0.06}


def step_sampler(a) -> dict:
    from hdm_core.pipeline import sample_latents
    from hdm_core.rope import position_map
    from hdm_core.sampler import Conditioning

    dev = torch.device(a.device)
    res = {}
    for sampler in ("euler", "heun"):
        lats = []
        for d in (dev, torch.device("cpu")):
            model = _model("xut-debug", d)
            x, ctx = _inputs(model.config, d, 2, 16, 8)
            pos = position_map(16, 16, device=d)[None].expand(2, -1, -1)
            c, u = Conditioning(ctx, pos), Conditioning(torch.zeros_like(ctx), pos)
            lats.append(sample_latents(model, x, c, u, steps=6, guidance_scale=3.0, sampler=sampler).cpu())
        res[sampler + "_device_vs_cpu_max_abs"] = (lats[0] - lats[1]).abs().max().item()
    res["ok"] = all(v < 1e-3 for v in res.values())  # fp32 on both (TF32 off by default for matmul)
    return res


def _trainer_run(a, name: str, preset: str, px: int, batch: int, steps: int, text_len: int) -> dict:
    """The real trainer (`python -m hdm_core.train`, [train] precision "auto") on a small generated data set, in
    pixel space with patch 16 (256 px = 256 image tokens, as a latent 32x32 with patch 2), the toy text encoder,
    TREAD 0.5. Returns the trainer's metrics rows and the resolved config."""
    import tempfile

    from PIL import Image, ImageDraw

    from hdm_core.precision import train_precision
    from hdm_core.train.config import config_from_dict, write_config
    from hdm_demo.text_encoder import build_toy_text_encoder

    dev = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix=f"device-check-{name}-"))
    data = tmp / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(max(batch, 8)):
        rgb = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
        img = Image.new("RGB", (px, px), (255, 255, 255))
        ImageDraw.Draw(img).ellipse((px // 4, px // 4, 3 * px // 4, 3 * px // 4), fill=rgb)
        img.save(data / f"{i:04d}.png")
        (data / f"{i:04d}.txt").write_text(f"a circle of color {rgb}")
    te = build_toy_text_encoder(tmp / "te")
    cfg = config_from_dict(
        {
            "seed": 0,
            "model": {"preset": preset, "overrides": {"in_channels": 3, "patch_size": 16, "ctx_dim": 64}},
            "codec": {"kind": "pixel"},
            "text_encoder": {"path": str(te), "max_length": text_len},
            "data": {"path": str(data), "num_workers": 0 if a.quick else 4},
            "train": {"device": dev.type, "checkpoint_every": 10_000, "keep_last_n": 1},
            "stages": [
                {"resolution": px, "batch_size": batch, "lr": 1e-4, "steps": steps, "tread_rate": 0.5}
            ],
        }
    )
    write_config(cfg, tmp / "train.toml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if dev.type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(dev.index or 0)
    done = subprocess.run(
        [sys.executable, "-m", "hdm_core.train", str(tmp / "train.toml"), "--run-dir", str(tmp / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    metrics = tmp / "run" / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "loss" in r]
    out = {"rc": done.returncode, "precision": train_precision("auto", dev), "rows": rows, "cfg": cfg}
    if done.returncode != 0 or len(rows) < steps:
        out["error"] = done.stderr[-1500:]
    return out


def step_train_step(a) -> dict:
    run = _trainer_run(a, "step", "xut-debug", 64, 2, 3, 8)
    losses = [r["loss"] for r in run["rows"]]
    ok = run["rc"] == 0 and len(losses) == 3 and all(v == v and v < 1e3 for v in losses)
    return {"precision": run["precision"], "losses": losses, "ok": ok} | (
        {"error": run["error"]} if "error" in run else {}
    )


def _ddp_rank(rank: int, world: int, backend: str, port: int, q) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hdm_core.flow import flow_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    dev = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    model = _model("xut-debug", dev).train()
    ddp = DDP(model, device_ids=[rank] if backend == "nccl" else None)
    x, ctx = _inputs(model.config, dev, 2, 16, 8)
    # addon_info given: every parameter gets a gradient, as DDP without find_unused_parameters needs.
    flow_loss(ddp, x + rank, ctx, addon_info=torch.zeros(x.shape[0], device=dev)).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref = g.clone()
    dist.broadcast(ref, 0)
    q.put((rank, (g - ref).abs().max().item()))
    dist.destroy_process_group()


def step_ddp(a) -> dict:
    import socket

    import torch.multiprocessing as mp

    backend = "nccl" if a.device.startswith("cuda") and torch.cuda.device_count() >= 2 else "gloo"
    if a.device.startswith("cuda") and backend == "gloo":
        return {"skipped": "fewer than 2 GPUs", "ok": True}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, backend, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    diffs = dict(q.get(timeout=5) for _ in range(2))
    return {
        "backend": backend,
        "grad_max_diff_between_ranks": max(diffs.values()),
        "ok": max(diffs.values()) == 0,
    }


def _sample_s(net, model, dev, px: int, steps: int, repeats: int) -> float:
    from hdm_core.pipeline import sample_latents
    from hdm_core.rope import position_map
    from hdm_core.sampler import Conditioning

    dtype = next(model.parameters()).dtype
    h = px // 8
    pos = position_map(h, h, device=dev)[None]
    addon = torch.zeros(1, device=dev)
    c = Conditioning(torch.randn(1, 64, model.config.ctx_dim, device=dev, dtype=dtype), pos, addon)
    u = Conditioning(torch.randn(1, 64, model.config.ctx_dim, device=dev, dtype=dtype), pos, addon)
    noise = torch.randn(1, model.config.in_channels, h, h, device=dev)
    times = []
    for i in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        sample_latents(net, noise, c, u, steps=steps, guidance_scale=3.0)
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def step_infer(a) -> dict:
    from bench.flops import xut_forward_flops
    from hdm_core.compile import compile_model
    from hdm_core.precision import resolve_dtype

    dev = torch.device(a.device)
    preset, px, steps = ("xut-debug", 256, 2) if a.quick else ("xut-base", 1024, 28)
    model = _model(preset, dev, resolve_dtype("auto", dev))
    out = {"preset": preset, "px": px, "steps": steps, "dtype": str(next(model.parameters()).dtype)}
    with torch.no_grad():
        out["eager_s_per_img"] = _sample_s(model, model, dev, px, steps, 1 if a.quick else 3)
        try:
            net = compile_model(
                model, "default" if dev.type == "cpu" else "max-autotune-no-cudagraphs", device=dev
            )
            out["compiled_s_per_img"] = _sample_s(net, model, dev, px, steps, 1 if a.quick else 3)
        except Exception as exc:  # recorded, the eager number stands
            out["compiled_error"] = repr(exc)[:500]
    flops = 2 * steps * xut_forward_flops(model.config, (px // 16) ** 2, 64)
    out["tflop_per_img"] = flops / 1e12
    out["ok"] = True
    return out


def step_train_mfu(a) -> dict:
    """img/s and MFU of the real trainer at 256 px, TREAD 0.5 (the first two steps, compile and warm-up, left out)."""
    from bench.flops import xut_forward_flops
    from hdm_core.train.components import build_model

    preset, batch, steps, text_len = ("xut-debug", 2, 4, 16) if a.quick else ("xut-base", 64, 12, 256)
    run = _trainer_run(a, "mfu", preset, 256, batch, steps, text_len)
    times = sorted(r["step_time_s"] for r in run["rows"][2:])
    out = {"preset": preset, "px": 256, "batch": batch, "tread": 0.5, "precision": run["precision"]}
    if "error" in run or not times:
        return out | {"ok": False, "error": run.get("error", "no steps measured")}
    s = times[len(times) // 2]
    model_cfg = build_model(run["cfg"]).config
    tokens = (256 // model_cfg.patch_size) ** 2
    flops = 3 * xut_forward_flops(model_cfg, tokens, text_len, tread_rate=0.5) * batch
    out |= {"img_per_s": batch / s, "step_time_s": s, "tflop_per_step": flops / 1e12, "ok": True}
    if torch.device(a.device).type == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
        out |= {"tflops": flops / s / 1e12, "mfu": flops / s / 1e12 / peak, "peak_bf16_tflops": peak}
    return out


def step_worker(a) -> dict:
    import socket
    import tempfile

    import httpx

    from hdm_core import PRESETS, XUT, save_checkpoint
    from hdm_core.codec import PixelCodec
    from hdm_demo.text_encoder import build_toy_text_encoder

    tmp = Path(tempfile.mkdtemp(prefix="hdm-device-check-"))
    (tmp / "models").mkdir()
    save_checkpoint(tmp / "models" / "tiny.safetensors", XUT(PRESETS["xut-pixel-debug"]), codec=PixelCodec())
    te = build_toy_text_encoder(tmp / "te", hidden_size=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HDM_DATABASE_URL": f"sqlite:///{tmp}/hdm.db",
        "HDM_BROKER_URL": "db://",
        "HDM_MODELS_DIR": str(tmp / "models"),
        "HDM_TEXT_ENCODER": str(te),
        "HDM_OUTPUTS_DIR": str(tmp / "out"),
        "HDM_DATA_ROOT": str(tmp / "data"),
        "HDM_RUNS_DIR": str(tmp / "runs"),
        "HDM_DEVICE": a.device,
        "HDM_IMAGE_MIN_SIZE": "32",
        "HDM_API_KEYS": "",
    }
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cli, "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        t0 = time.perf_counter()
        r = httpx.post(
            base + "/v1/images",
            json={
                "prompt": "a red circle",
                "model": "tiny",
                "width": 32,
                "height": 32,
                "steps": 4,
                "seed": 1,
            },
            timeout=30,
        )
        r.raise_for_status()
        job = r.json()
        while time.monotonic() < deadline + 60 and job.get("status") not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.3)
            job = httpx.get(f"{base}/v1/images/{job['id']}", timeout=10).json()
        return {
            "status": job.get("status"),
            "job_s": time.perf_counter() - t0,
            "device": a.device,
            "timings": job.get("timings"),
            "ok": job.get("status") == "succeeded",
            "log_tail": (tmp / "serve.log").read_text(errors="replace")[-800:]
            if job.get("status") != "succeeded"
            else "",
        }
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)


STEPS = {
    "env": (step_env, 30),
    "parity": (step_parity, 90),
    "sampler": (step_sampler, 60),
    "train_step": (step_train_step, 60),
    "ddp": (step_ddp, 120),
    "infer": (step_infer, 200),
    "train_mfu": (step_train_mfu, 150),
    "worker": (step_worker, 150),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--quick", action="store_true", help="small models and sizes (CPU / CI)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT or bench/results/)")
    parser.add_argument("--step", choices=sorted(STEPS), help="internal: run one step, print its JSON")
    parser.add_argument("--only", nargs="+", choices=sorted(STEPS), default=list(STEPS))
    a = parser.parse_args()
    if a.step:
        print("DEVICE_CHECK_RESULT " + json.dumps(STEPS[a.step][0](a)))
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    path = a.out or out_dir / f"device_check-{a.device.replace(':', '')}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": a.device, "quick": a.quick, "started": stamp, "steps": {}}
    for name in a.only:
        limit = STEPS[name][1]
        limit = limit if not a.quick else min(limit, 150)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench.device_check", "--step", name, "--device", a.device]
        try:
            done = subprocess.run(
                cmd + (["--quick"] if a.quick else []),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=limit,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            line = next(
                (ln for ln in done.stdout.splitlines() if ln.startswith("DEVICE_CHECK_RESULT ")), None
            )
            res = json.loads(line.split(" ", 1)[1]) if line else {"ok": False, "error": done.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": f"timed out after {limit} s"}
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        report["steps"][name] = res
        print(f"{name:<11} {'ok' if res.get('ok') else 'FAILED'}  {res['wall_s']:.1f} s", flush=True)
        path.write_text(json.dumps(report, indent=1))  # after every step: a killed run keeps what it measured
    report["all_ok"] = all(r.get("ok") for r in report["steps"].values())
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
