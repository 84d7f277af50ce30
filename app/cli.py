"""``hdm`` command line: serve, worker, migrate, generate, tune-schedule, models import, adapters import/merge, train."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.registry_commands import (
    cmd_adapters_import,
    cmd_adapters_merge,
    cmd_keys_create,
    cmd_keys_revoke,
    cmd_models_import,
    load_settings,
)
from app.settings import DTYPES, Settings
from hdm_core.config import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_INFO, SAMPLER_NAMES, SCHEDULE_NAMES

log = logging.getLogger("hdm")


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    url = args.url or load_settings().database_url
    upgrade(url, args.revision)
    log.info("database at %s", args.revision)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Embedded mode: API + one worker, SQLite and the jobs table as queue, unless HDM_* say otherwise."""
    import uvicorn

    os.environ.setdefault("HDM_BROKER_URL", "db://")
    os.environ.setdefault("HDM_DATABASE_URL", "sqlite:///var/hdm.db")
    settings = load_settings()
    from app.migrate import upgrade

    upgrade(settings.database_url)
    worker = None
    if not args.no_worker:
        from app.procutil import PARENT_PID_ENV, die_with_parent

        cmd = [sys.executable, "-m", "app.cli", "worker"]
        # the worker dies with this process even when it is SIGKILLed (PR_SET_PDEATHSIG; the embedded poll loop
        # also checks its parent pid)
        worker = subprocess.Popen(
            cmd,
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log.info("worker pid %d (%s)", worker.pid, "embedded" if settings.embedded else "celery")
    try:
        uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.slot is not None:
        os.environ["HDM_GPU_INDEX"] = str(args.slot)
    settings = load_settings()
    if settings.embedded:  # the jobs table is the queue: worker/embedded.py (app never imports worker)
        os.execv(sys.executable, [sys.executable, "-m", "worker.embedded"])
    if args.trainer:
        # the trainer service: sees every GPU of its machine, runs only train jobs (hdm.train.<slot> for the
        # machine's slots) and gives torchrun CUDA_VISIBLE_DEVICES = the leased slots (worker/training.py)
        if settings.gpu_index is not None:
            log.error("hdm worker --trainer must not be pinned to one slot (unset HDM_GPU_INDEX)")
            return 2
        queues = (
            args.queues
            or settings.worker_queues
            or ",".join(settings.train_queue(s) for s in settings.local_slot_list)
        )
        name = args.name or "trainer@%h"
    else:
        slot = settings.gpu_index if settings.gpu_index is not None else settings.slot_list[0]
        os.environ["HDM_GPU_INDEX"] = str(slot)
        queues = (
            args.queues
            or settings.worker_queues
            or ",".join([settings.slot_queue(slot), settings.image_queue, settings.train_queue(slot)])
        )
        name = args.name or f"slot{slot}@%h"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--concurrency",
        str(args.concurrency),
        "--prefetch-multiplier",
        "1",
        "-Q",
        queues,
        "--loglevel",
        args.loglevel,
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
    ]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def _text_encoder(args: argparse.Namespace, settings: Settings) -> str | Path | None:
    """--text-encoder, else HDM_TEXT_ENCODER; None (logged) when neither is set."""
    te = args.text_encoder or settings.text_encoder
    if te is None:
        log.error("give --text-encoder or set HDM_TEXT_ENCODER")
    return te


def _local_pipeline(args: argparse.Namespace, settings: Settings, te: str | Path) -> Any:
    """The pipeline of --model on --device / --dtype (else HDM_DEVICE / HDM_DTYPE), for the local commands."""
    from hdm_core.allocator import keep_freed_memory
    from hdm_core.pipeline import HDMPipeline

    keep_freed_memory()  # as the workers (hdm_core/allocator.py)
    device, dtype = args.device or settings.device, args.dtype or settings.dtype
    return HDMPipeline.from_paths(args.model, te, device=device, dtype=dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    from hdm_core import imagefile
    from hdm_core.pipeline import Camera
    from hdm_core.precision import dtype_name

    settings = load_settings()
    te = _text_encoder(args, settings)
    if te is None:
        return 2
    pipe = _local_pipeline(args, settings, te)
    schedule = args.schedule or SAMPLER_INFO[args.sampler].default_schedule
    res = pipe.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        n=args.n,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        sampler=args.sampler,
        schedule=schedule,
        camera=Camera(args.x_shift, args.y_shift, args.zoom),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    req = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "sampler": args.sampler,
        "schedule": schedule,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "camera": {"x_shift": args.x_shift, "y_shift": args.y_shift, "zoom": args.zoom},
    }
    for img, seed in zip(res.images, res.seeds, strict=True):
        path = out / f"{seed}.png"
        imagefile.save(
            img,
            path,
            "png",
            imagefile.parameters_text(
                req,
                seed=seed,
                model_name=Path(args.model).stem,
                model_hash=None,
                extra=(*imagefile.schedule_fields(schedule, res.times), f"Dtype: {dtype_name(pipe.dtype)}"),
            ),
        )
        print(path)
    return 0


def cmd_tune_schedule(args: argparse.Namespace) -> int:
    """Search the model's own `tuned` knots on the given prompts and write them beside the checkpoint."""
    import time

    from hdm_core.batching import ImageJob
    from hdm_core.data.captions import distinct_prompts
    from hdm_core.files import sha256_file
    from hdm_core.samplers.schedules import write_tuned_schedule
    from hdm_core.samplers.tuning import reference_latents, tune_schedule

    settings = load_settings()
    te = _text_encoder(args, settings)
    if te is None:
        return 2
    try:
        prompts = distinct_prompts(args.prompts, limit=args.max_prompts)
    except (OSError, UnicodeDecodeError) as exc:
        log.error("--prompts: %s", exc)
        return 2
    if not prompts:
        log.error(
            "--prompts %s holds no prompt (a text file, one per line, or a data folder with captions)",
            args.prompts,
        )
        return 2
    pipe = _local_pipeline(args, settings, te)  # sampling runs without autograd (generate_batch is no_grad)
    try:
        pipe.check_size(args.width, args.height)
    except ValueError as exc:
        log.error("--width/--height: %s", exc)
        return 2
    jobs = [ImageJob(prompts, seed=args.seed + k * len(prompts)) for k in range(args.seeds)]
    generate = {"width": args.width, "height": args.height, "guidance_scale": args.guidance_scale}
    t0 = time.perf_counter()
    reference = reference_latents(pipe, jobs, steps=args.reference_steps, **generate)
    log.info("references: %d images, %.0f s", len(reference), time.perf_counter() - t0)
    schedule = tune_schedule(
        pipe, jobs, reference, samplers=args.samplers, steps=args.steps, min_delta=args.min_delta, **generate
    )
    path = Path(args.model)
    schedule.meta.update(
        checkpoint_sha256=sha256_file(path) if path.is_file() else None,
        prompts=len(prompts),
        seeds=args.seeds,
        reference=f"euler {args.reference_steps} uniform",
        seconds=round(time.perf_counter() - t0, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    for sampler, found in schedule.meta["found"].items():
        knots = ", ".join(f"{k:.4f}" for k in schedule.knots[sampler])
        ratio = found["distance"] / found["uniform_distance"]
        print(f"{sampler}: {ratio:.2f}x the uniform schedule's distance at {args.steps} steps; knots {knots}")
    print(write_tuned_schedule(path, schedule))
    return 0


def _at_least(lo: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def _min_delta(text: str) -> float:
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5], got {value}")
    return value


def _sampler_list(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in SAMPLER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown}; choose from {list(SAMPLER_NAMES)}")
    return names


def cmd_train(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "hdm_core.train", args.config, "--run-dir", args.run_dir]
    if args.resume:
        argv.append("--resume")
    return subprocess.call(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdm", description="HDM Serve: train and serve HDM models.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="API + worker in one command (embedded: SQLite, no Redis)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true")
    s.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="one worker process per GPU (Celery, or the embedded DB poller)")
    w.add_argument("--slot", type=int, default=None, help="GPU index / CPU slot (default HDM_GPU_INDEX)")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--queues", default=None)
    w.add_argument("--name", default=None)
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--trainer",
        action="store_true",
        help="train jobs only, for a process that sees all of its machine's GPUs (compose 'trainer')",
    )
    w.set_defaults(func=cmd_worker)
    m = sub.add_parser("migrate", help="upgrade the database schema (alembic)")
    m.add_argument("--url", default=None)
    m.add_argument("--revision", default="head")
    m.set_defaults(func=cmd_migrate)
    g = sub.add_parser("generate", help="generate images locally, without the server")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="checkpoint .safetensors")
    g.add_argument("--text-encoder", default=None)
    g.add_argument("--out", default="outputs")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    g.add_argument("--guidance-scale", type=float, default=3.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        choices=SAMPLER_NAMES,
        help='what each is good for: docs/service.md "Samplers"',
    )
    g.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES, help="default: the sampler's own")
    g.add_argument("--x-shift", type=float, default=0.0)
    g.add_argument("--y-shift", type=float, default=0.0)
    g.add_argument("--zoom", type=float, default=1.0)
    g.add_argument("--device", default=None)
    g.add_argument(
        "--dtype", default=None, choices=DTYPES, help="default HDM_DTYPE (auto: bf16 on CUDA, fp32 on CPU)"
    )
    g.set_defaults(func=cmd_generate)
    ts = sub.add_parser(
        "tune-schedule",
        help="search the model's own `tuned` schedule on your prompts; written beside the checkpoint "
        '(docs/service.md "Samplers")',
    )
    ts.add_argument("--model", required=True, help="checkpoint .safetensors (or a diffusers-style folder)")
    ts.add_argument(
        "--prompts",
        required=True,
        help="a text file, one prompt per line, or a training-data folder (its images' .txt captions)",
    )
    ts.add_argument(
        "--max-prompts", type=_at_least(1), default=16, help="thin more prompts than this, evenly"
    )
    ts.add_argument("--text-encoder", default=None)
    ts.add_argument(
        "--samplers",
        type=_sampler_list,
        default=["unipc", "dpmpp_2m"],
        help="comma-separated, one set of knots each (default unipc,dpmpp_2m; the others use the first's)",
    )
    ts.add_argument("--steps", type=_at_least(2), default=8, help="the step count the knots are searched at")
    ts.add_argument("--seeds", type=_at_least(1), default=2, help="noise draws per prompt")
    ts.add_argument("--seed", type=_at_least(0), default=0)
    ts.add_argument("--width", type=int, default=1024)
    ts.add_argument("--height", type=int, default=1024)
    ts.add_argument("--guidance-scale", type=float, default=3.0)
    ts.add_argument(
        "--reference-steps", type=_at_least(1), default=400, help="Euler steps of the exact solution"
    )
    ts.add_argument(
        "--min-delta", type=_min_delta, default=0.06, help="the search's finest move, in logit(t)"
    )
    ts.add_argument("--device", default=None)
    ts.add_argument("--dtype", default=None, choices=DTYPES)
    ts.set_defaults(func=cmd_tune_schedule)
    mo = sub.add_parser("models", help="model registry")
    mos = mo.add_subparsers(dest="models_command", required=True)
    imp = mos.add_parser("import", help="register a checkpoint file")
    imp.add_argument("path")
    imp.add_argument("--name", default=None)
    imp.add_argument(
        "--revive",
        action="store_true",
        help="register the file of a deleted model again (lifts its tombstone)",
    )
    imp.set_defaults(func=cmd_models_import)
    ad = sub.add_parser("adapters", help="LyCORIS adapters: register, merge into a checkpoint")
    ads = ad.add_subparsers(dest="adapters_command", required=True)
    adi = ads.add_parser(
        "import",
        help="register an adapter file: this service's own, LyCORIS (also `lycoris_model_` keys), kohya "
        "`lora_unet_` or peft `lora_A`/`lora_B`; .safetensors, or .pt/.ckpt read with torch.load(weights_only=True)",
    )
    adi.add_argument("path")
    adi.add_argument("--name", default=None)
    adi.add_argument(
        "--revive",
        action="store_true",
        help="register the file of a deleted adapter again (lifts its tombstone)",
    )
    adi.add_argument(
        "--base-model",
        default=None,
        help="model id or name to check the shapes against (default: the default)",
    )
    adi.set_defaults(func=cmd_adapters_import)
    adm = ads.add_parser("merge", help="write BASE with the adapters merged in as a full checkpoint")
    adm.add_argument("base", help="base checkpoint .safetensors")
    adm.add_argument(
        "adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapter file, weight 1 by default"
    )
    adm.add_argument("--out", required=True, help="the merged checkpoint (.safetensors)")
    adm.set_defaults(func=cmd_adapters_merge)
    k = sub.add_parser("keys", help="API keys stored in the database (hashed)")
    ks = k.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create a key and print it once")
    kc.add_argument("name")
    kc.set_defaults(func=cmd_keys_create)
    kr = ks.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys_revoke)
    t = sub.add_parser("train", help="run the trainer (python -m hdm_core.train)")
    t.add_argument("config")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
