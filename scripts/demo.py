"""`make demo`: the whole product on a laptop, no downloads.

Starts the service in embedded mode (SQLite, in-database queue, one CPU worker), writes a synthetic captioned set
(coloured shapes), registers it through /v1/datasets, pretrains a small pixel-space XUT through /v1/train-jobs
(two progressive stages, TREAD on), then draws prompts the training never saw through /v1/images and writes the
images, a labelled contact sheet and the loss curve to an output folder. Everything is kept under var/demo, so a
second run reuses the environment, the text encoder and the dataset.

By default the service is stopped cleanly at the end; `--keep-serving` leaves it answering until Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from hdm_core.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")

# Two progressive stages (16 px, then 32 px), TREAD on. lr is the muP-style base rate: each parameter gets
# lr / fan_in (spec §6). Shorter or faster-learning variants cost shape accuracy (docs/training.md "CPU demo":
# 1,300 steps 0.70, lr 1.0 0.54, batch 8 0.46); README "Quick start" lists the machines measured.
STAGES = [
    {
        "resolution": 16,
        "steps": 400,
        "batch_size": 32,
        "lr": 0.5,
        "tread_rate": 0.5,
        "warmup_steps": 30,
        "caption_dropout": 0.1,
    },
    {
        "resolution": 32,
        "steps": 1700,
        "batch_size": 16,
        "lr": 0.5,
        "tread_rate": 0.5,
        "warmup_steps": 30,
        "caption_dropout": 0.1,
    },
]
# xut-pixel-debug (2.5M parameters, pixel space) with 4 px patches: 64 tokens at 32 px, 3.4x the images per second
# of 2 px patches on a CPU. Sent as an architecture object, as a user would for their own variant.
ARCH = dataclasses.asdict(PRESETS["xut-pixel-debug"].replace(patch_size=4))
# Flat shapes on plain backgrounds are recognisable through a lot of noise, so where they go and what colour they
# are is decided in the first, noisiest sampling steps; the reference's logit-normal(0, 1) rarely trains there.
T_LOGIT_MEAN = 1.0
# The captions are 11-12 tokens: padding to the spec's 256 would make every step 10x longer, and each pad token
# goes through every block (TREAD routes image tokens only).
TEXT_MAX_LENGTH = 12
IMAGE_SIZE = 32
DATASET_SIZE = 2000


def omp_wait_policy() -> str | None:
    """PASSIVE when the CPU is already busy at start, else OpenMP's default (None).

    torch's OpenMP threads (the trainer's 2 on 2 cores) spin a while before they sleep when they wait for each
    other. On a CPU shared with other work a spinning thread burns the time its partner needs (measured on a loaded
    2-core AMD EPYC: a demo train step took 30 s instead of 0.4 s), so PASSIVE waits, which sleep at once, win
    there; on an idle CPU they cost the trainer run alone a quarter of every step (0.33 s vs 0.25 s per 32 px step,
    docs/training.md "CPU demo"). One second of /proc/stat before the demo starts work tells the two apart (the load average
    would still count the `make venv` that just ran)."""
    busy = cpu_busy_fraction()
    return "PASSIVE" if busy is not None and busy > 0.4 else None


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores' time spent busy over `seconds` (Linux /proc/stat); None where there is none."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(var: Path) -> dict[str, Path]:
    """Text encoder and dataset, made once and reused."""
    from hdm_demo.assets import ensure_shapes, ensure_text_encoder

    paths = {
        "te": var / "text-encoder",
        "data_root": var / "data",
        "dataset": var / "data" / "shapes",
        "models": var / "models",
        "outputs": var / "outputs",
        "runs": var / "runs",
    }
    for key in ("data_root", "models", "outputs", "runs"):
        paths[key].mkdir(parents=True, exist_ok=True)
    ensure_text_encoder(paths["te"], hidden_size=64)
    ensure_shapes(paths["dataset"], count=DATASET_SIZE, size=64, seed=0)
    return paths


@contextmanager
def service(var: Path, paths: dict[str, Path], port: int, *, keep: bool):
    env = os.environ | {
        "HDM_DATABASE_URL": f"sqlite:///{var / 'hdm.db'}",
        "HDM_BROKER_URL": "db://",
        "HDM_DATA_ROOT": str(paths["data_root"]),
        "HDM_MODELS_DIR": str(paths["models"]),
        "HDM_OUTPUTS_DIR": str(paths["outputs"]),
        "HDM_RUNS_DIR": str(paths["runs"]),
        "HDM_TEXT_ENCODER": str(paths["te"]),
        "HDM_SLOTS": "0",
        "HDM_DEVICE": "cpu",
        "HDM_IMAGE_MIN_SIZE": "32",
        "HDM_IMAGE_SIZE_MULTIPLE": "16",
        "PYTHONUNBUFFERED": "1",
    }
    policy = os.environ.get("OMP_WAIT_POLICY") or omp_wait_policy()
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    log_file = open(var / "service.log", "ab")  # noqa: SIM115 - lives as long as the service
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
        if keep:
            print(f"\nStill serving. Console: http://127.0.0.1:{port}/ (API docs: /docs). Ctrl-C stops it.")
            with suppress(KeyboardInterrupt):
                proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log_file.close()


def wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the service exited during start-up; see var/demo/service.log")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready; see var/demo/service.log")


def _check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        raise SystemExit(f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}: {resp.text}")
    return resp.json()


DONE = {"succeeded", "ready"}  # jobs end "succeeded"; a validated dataset is "ready"
FINAL = DONE | {"failed", "cancelled", "invalid"}


def wait_job(client: httpx.Client, url: str, *, label: str, show=None, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _check(client.get(url, headers={"Prefer": "wait=5"}))
        if show is not None:
            show(job)
        if job["status"] in FINAL:
            if job["status"] not in DONE:
                raise SystemExit(f"{label} ended {job['status']}: {job.get('error')}")
            return job
        time.sleep(0.5)
    raise SystemExit(f"{label} did not finish within {timeout:.0f} s")


class TrainProgress:
    """A progress bar on a terminal; one line per 10 % (or status change) when piped to a log."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last: tuple | None = None
        self.first: tuple[float, int] | None = None  # (time, step) of the first running report, for the ETA

    def __call__(self, job: dict) -> None:
        m = job.get("metrics") or {}
        step, total = job.get("step") or 0, job.get("total_steps") or 0
        done = int(30 * step / total) if total else 0
        loss = f"{m['loss']:.4f}" if m.get("loss") is not None else "-"
        eta_s = m.get("eta_s")
        if eta_s is None and job["status"] == "running" and step:
            self.first = self.first or (time.monotonic(), step)
            t0, s0 = self.first
            rate = (step - s0) / max(time.monotonic() - t0, 1e-6)
            eta_s = (total - step) / rate if rate > 0 else None
        eta = f"{eta_s:.0f}s" if eta_s is not None else "-"
        line = (
            f"  training [{'#' * done}{'.' * (30 - done)}] step {step}/{total} stage {job.get('stage')} "
            f"loss {loss} eta {eta} ({job['status']})"
        )
        if self.tty:
            sys.stdout.write("\r" + line + "   ")
            sys.stdout.flush()
            return
        key = (job["status"], job.get("stage"), done // 3)
        if key != self.last:
            print(line, flush=True)
            self.last = key


def train(client: httpx.Client, dataset_id: str) -> dict:
    body = {
        "name": "demo-shapes",
        "arch": ARCH,
        "dataset": dataset_id,
        "stages": STAGES,
        "gpus": 1,
        "precision": "fp32",
        "seed": 0,
        "checkpoint_every": 500,
        "keep_last_n": 2,
        "text_max_length": TEXT_MAX_LENGTH,
        "t_logit_mean": T_LOGIT_MEAN,
        # The 2,000 captions (and their dropped-caption variant) encoded once, not at every step.
        "cache": {"text": True},
    }
    job = _check(client.post("/v1/train-jobs", json=body))
    print(
        f"  train job {job['id']} submitted ({len(STAGES)} stages: "
        f"{', '.join(str(s['resolution']) + ' px' for s in STAGES)}; TREAD 0.5; xut-pixel-debug, 4 px patches)"
    )
    job = wait_job(
        client, f"/v1/train-jobs/{job['id']}", label="training", show=TrainProgress(), timeout=1200
    )
    print()
    return job


def loss_events(client: httpx.Client, job_id: str) -> list[tuple[int, float]]:
    """Every metrics event of the job, following the list's pages (1,000 events each)."""
    points, after = [], 0
    while True:
        page = _check(client.get(f"/v1/train-jobs/{job_id}/events", params={"after": after}))
        points += [
            (e["data"]["step"], e["data"]["loss"])
            for e in page["data"]
            if e["type"] == "metrics" and e["data"].get("loss") is not None
        ]
        if not page.get("has_more") or not page["data"]:
            return points
        after = page["data"][-1]["id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--var", type=Path, default=ROOT / "var" / "demo", help="state folder (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output", help="where images go")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--keep-serving", action="store_true", help="leave the service running at the end")
    parser.add_argument("--quick", action="store_true", help="tiny schedule (for the CI test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A SIGTERM (e.g. a timeout) must still stop the service it started, through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    from hdm_demo.scoring import score_files
    from scripts.demo_report import contact_sheet, loss_curve, pick_prompts

    if args.quick:
        global STAGES, DATASET_SIZE
        STAGES = [dict(s, steps=s_steps, batch_size=4) for s, s_steps in zip(STAGES, (6, 4), strict=True)]
        DATASET_SIZE = 64
    var = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)
    print("1/5 preparing the text encoder and the synthetic dataset")
    paths = prepare(var)
    port = args.port or _free_port()
    print(f"2/5 starting the service (embedded mode: SQLite + in-database queue) on http://127.0.0.1:{port}")
    with (
        service(var, paths, port, keep=args.keep_serving) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90) as client,
    ):
        wait_ready(client, proc)
        ds = _check(client.post("/v1/datasets", json={"name": "shapes", "path": "shapes"}))
        ds = wait_job(client, f"/v1/datasets/{ds['id']}", label="dataset validation")
        print(f"3/5 dataset {ds['id']} registered: {json.dumps(ds.get('stats') or {}, default=str)[:200]}")
        print("4/5 pretraining through /v1/train-jobs")
        job = train(client, ds["id"])
        if not job.get("checkpoints"):
            raise SystemExit(f"train job {job['id']} registered no checkpoint")
        model_id = job["checkpoints"][-1]  # ordered by step: the final weights
        prompts = pick_prompts(paths["dataset"] / "heldout.json")
        if args.quick:
            prompts = prompts[::3]
        print(f"5/5 drawing {len(prompts)} held-out prompts through /v1/images with model {model_id}")
        images = []
        for i, spec in enumerate(prompts):
            body = {
                "prompt": spec["caption"],
                "model": model_id,
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "steps": 24,
                "guidance_scale": 3.0,
                "seed": 1000 + i,
                "n": 1,
            }
            img_job = _check(client.post("/v1/images", json=body, headers={"Prefer": "wait=60"}))
            img_job = wait_job(client, f"/v1/images/{img_job['id']}", label=f"image {i}")
            data = client.get(f"/v1/images/{img_job['id']}/files/0").content
            images.append((spec, data))
        args.out.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (spec, data) in enumerate(images):
            path = args.out / f"{i:02d}-{spec['colour']}-{spec['shape']}.png"
            path.write_bytes(data)
            files.append(path)
        sheet = contact_sheet(files, [s["caption"] for s, _ in images], args.out / "contact_sheet.png")
        curve = loss_curve(loss_events(client, job["id"]), args.out / "loss_curve.png")
        scores = score_files(files, [s for s, _ in images]).fractions()
        print(f"\nImages: {args.out}/  contact sheet: {sheet}  loss curve: {curve}")
        print(
            f"Held-out prompts followed: colour {scores['colour']:.0%}, shape {scores['shape']:.0%}, "
            f"both {scores['both']:.0%} (over {len(files)} images; see hdm_demo/scoring.py for the method)"
        )
        print(f"Total time {time.monotonic() - t0:.0f} s.")
        (args.out / "summary.json").write_text(
            json.dumps(
                {
                    "colour_accuracy": scores["colour"],
                    "shape_accuracy": scores["shape"],
                    "both_accuracy": scores["both"],
                    "images": [str(f) for f in files],
                    "train_job": job["id"],
                    "model": model_id,
                    "seconds": time.monotonic() - t0,
                },
                indent=1,
            )
        )
        if not args.keep_serving:
            print("Stopping the service (`make demo DEMO_ARGS=--keep-serving` keeps it running).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
