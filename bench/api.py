"""API benchmark against the real stack (uvicorn + PostgreSQL + Redis + a Celery worker).

    python -m bench.api                  # starts its own stack (temp PostgreSQL db, Redis db 15, tiny model)
    python -m bench.api --url http://127.0.0.1:8000 --key KEY --model NAME   # an existing server

Measures requests/s and p50/p99 latency of POST /v1/images (enqueue only, no worker consuming) and
GET /v1/images/{id}, then the queue overhead: job created_at (API) -> started_at (worker claimed it), p50/p99, with
one worker taking 32x32, 1-step jobs one at a time. Prints a table and writes JSON (--out).

    python -m bench.api --poll-rates 50,100,200,400   # also: the status-poll rate sweep

The sweep holds each rate of GET /v1/images/{id} for --seconds, open loop (requests leave on schedule whether or
not earlier ones came back; latency counts from the scheduled time, so a server that falls behind shows it), while
--create-rate POST /v1/images per second go to the one worker. It prints p50/p99 per rate, the API process's CPU
use, and the highest rate whose poll p99 stays under --p99-ms."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.api")
JOB = {"prompt": "bench", "width": 32, "height": 32, "steps": 1}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def _load(client: httpx.AsyncClient, make: Any, total: int, concurrency: int) -> dict[str, Any]:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    ids: list[str] = []
    counter = iter(range(total))

    async def one() -> None:
        for i in counter:
            t0 = time.perf_counter()
            r = await make(client, i)
            lat.append(time.perf_counter() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code in (200, 202) and r.request.method == "POST":
                ids.append(r.json()["id"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": total,
        "concurrency": concurrency,
        "rps": round(total / wall, 1),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
        "statuses": statuses,
        "ids": ids,
    }


async def http_bench(url: str, key: str, n: int, concurrency: int, model: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**JOB, **({"model": model} if model else {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        for _ in range(20):  # warm-up
            await c.get("/healthz")

        async def post(cl: httpx.AsyncClient, _i: int) -> httpx.Response:
            return await cl.post("/v1/images", json=body)

        post_res = await _load(c, post, n, concurrency)
        ids = post_res.pop("ids")

        async def get(cl: httpx.AsyncClient, i: int) -> httpx.Response:
            return await cl.get(f"/v1/images/{ids[i % len(ids)]}")

        get_res = await _load(c, get, n, concurrency)
        get_res.pop("ids")
        for job_id in ids:  # leave nothing behind for the worker
            await c.post(f"/v1/images/{job_id}/cancel")
    return {"post_images": post_res, "get_image": get_res}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _open_loop(
    url: str, key: str, rate: float, seconds: float, create_rate: float, ids: list[str], api_pid: int | None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    polls: list[float] = []
    creates: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2

        async def one(at: float, make: Any, into: list[float]) -> None:
            await asyncio.sleep(max(0.0, at - loop.time()))
            try:
                code = (await make()).status_code
            except httpx.HTTPError:  # timed out or refused: counted, and its wait is in the latencies
                code = 0
            into.append(loop.time() - at)  # from the scheduled time: no coordinated omission
            statuses[code] = statuses.get(code, 0) + 1

        n_poll, n_create = int(rate * seconds), int(create_rate * seconds)
        tasks = [
            one(t0 + i / rate, lambda i=i: c.get(f"/v1/images/{ids[i % len(ids)]}"), polls)
            for i in range(n_poll)
        ]
        tasks += [
            one(t0 + i / create_rate, lambda: c.post("/v1/images", json=JOB), creates)
            for i in range(n_create)
        ]
        cpu0, w0 = (_cpu_s(api_pid) if api_pid else 0.0), time.monotonic()
        await asyncio.gather(*tasks)
        cpu = (_cpu_s(api_pid) - cpu0) / (time.monotonic() - w0) if api_pid else None
    return {
        "rate": rate,
        "polls": len(polls),
        "poll_p50_ms": round(pct(polls, 50) * 1000, 2),
        "poll_p99_ms": round(pct(polls, 99) * 1000, 2),
        "creates": len(creates),
        "create_p50_ms": round(pct(creates, 50) * 1000, 2) if creates else None,
        "create_p99_ms": round(pct(creates, 99) * 1000, 2) if creates else None,
        "api_cpu": round(cpu, 2) if cpu is not None else None,
        "statuses": statuses,
    }


def poll_sweep(
    url: str, key: str, rates: list[float], seconds: float, create_rate: float, api_pid: int | None
) -> dict[str, Any]:
    """Runs in this process, apart from the API server (its own process) and the worker."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:  # jobs to poll, some done, some queued
        ids = [c.post("/v1/images", json=JOB, headers={"Prefer": "wait=30"}).json()["id"] for _ in range(20)]
    steps = []
    for rate in rates:
        steps.append(asyncio.run(_open_loop(url, key, rate, seconds, create_rate, ids, api_pid)))
        log.info("rate %.0f/s: %s", rate, steps[-1])
        if steps[-1]["poll_p99_ms"] > 2000:  # far past saturation: higher rates only queue up more
            break
    return {"seconds": seconds, "create_rate": create_rate, "steps": steps}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def queue_overhead(url: str, key: str, n: int, model: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**JOB, **({"model": model} if model else {})}
    waits: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        c.post("/v1/images", json=body, headers={"Prefer": "wait=60"})  # model load, outside the numbers
        for _ in range(n):
            job = c.post("/v1/images", json=body, headers={"Prefer": "wait=60"}).json()
            if job.get("started_at"):
                waits.append(_ts(job["started_at"]) - _ts(job["created_at"]))
    return {
        "jobs": len(waits),
        "p50_ms": round(pct(waits, 50) * 1000, 2),
        "p99_ms": round(pct(waits, 99) * 1000, 2),
        "max_ms": round(max(waits) * 1000, 2),
    }


class OwnStack:
    """A throw-away stack: PostgreSQL database, Redis db 15 with its own queue prefix, API and one worker."""

    def __init__(self) -> None:
        import psycopg

        import hdm_core
        from hdm_core.codec import PixelCodec
        from hdm_demo.text_encoder import build_toy_text_encoder

        self.tmp = Path(tempfile.mkdtemp(prefix="hdm-bench-"))
        (self.tmp / "models").mkdir()
        hdm_core.save_checkpoint(
            self.tmp / "models" / "tiny.safetensors",
            hdm_core.XUT(hdm_core.PRESETS["xut-pixel-debug"]),
            codec=PixelCodec(),
        )
        te = build_toy_text_encoder(self.tmp / "te")
        self.db = f"hdm_bench_{secrets.token_hex(4)}"
        self.admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True)
        self.admin.execute(f'CREATE DATABASE "{self.db}"')
        self.key = secrets.token_hex(16)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "HDM_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1/{self.db}",
            "HDM_BROKER_URL": "redis://127.0.0.1:6379/15",
            "HDM_QUEUE_PREFIX": f"bench{self.db[-8:]}",
            "HDM_MODELS_DIR": str(self.tmp / "models"),
            "HDM_TEXT_ENCODER": str(te),
            "HDM_OUTPUTS_DIR": str(self.tmp / "out"),
            "HDM_DATA_ROOT": str(self.tmp / "data"),
            "HDM_RUNS_DIR": str(self.tmp / "runs"),
            "HDM_API_KEYS": self.key,
            "HDM_IMAGE_MIN_SIZE": "32",
            "HDM_WEBHOOK_SECRET": secrets.token_hex(16),
            "HDM_QUEUE_LIMIT": "1000000",
            "HDM_GPU_INDEX": "0",
        }
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        self.port = 18000 + secrets.randbelow(1000)
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "api.log").open("wb"),
        )
        self.worker: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("API did not start")

    def start_worker(self) -> None:
        prefix = self.env["HDM_QUEUE_PREFIX"]
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--concurrency",
                "1",
                "--prefetch-multiplier",
                "1",
                "-Q",
                f"{prefix}.gpu.0,{prefix}.images",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "worker.log").open("wb"),
            start_new_session=True,
        )

    def close_worker(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.pid, signal.SIGTERM)
            self.worker.wait(timeout=30)
            self.worker = None

    def close(self) -> None:
        self.close_worker()
        self.api.terminate()
        self.api.wait(timeout=30)
        self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.db,)
        )
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db}"')


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--key", default="")
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--queue-jobs", type=int, default=100)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--poll-rates", default="", help="status polls/s to hold, e.g. 50,100,200 (the sweep)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each rate is held")
    p.add_argument(
        "--create-rate", type=float, default=2.0, help="POST /v1/images per second during the sweep"
    )
    p.add_argument("--p99-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    own = None if args.url else OwnStack()
    url, key = (args.url, args.key) if own is None else (own.url, own.key)
    try:
        res = asyncio.run(http_bench(url, key, args.requests, args.concurrency, args.model))
        if own is not None:
            own.start_worker()
        res["queue_overhead"] = queue_overhead(url, key, args.queue_jobs, args.model)
        if args.poll_rates:
            rates = [float(r) for r in args.poll_rates.split(",")]
            pid = own.api.pid if own is not None else None
            res["poll_sweep"] = poll_sweep(url, key, rates, args.seconds, args.create_rate, pid)
    finally:
        if own is not None:
            own.close()
    res["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    res["setup"] = "one uvicorn process (no --workers), PostgreSQL + Redis on loopback, 1 Celery worker"
    for name in ("post_images", "get_image"):
        r = res[name]
        log.info(
            "%-22s %8.1f req/s   p50 %7.2f ms   p99 %7.2f ms   (%d requests, concurrency %d, %s)",
            name,
            r["rps"],
            r["p50_ms"],
            r["p99_ms"],
            r["requests"],
            r["concurrency"],
            r["statuses"],
        )
    q = res["queue_overhead"]
    log.info(
        "%-22s p50 %7.2f ms   p99 %7.2f ms   max %7.2f ms   (%d jobs, enqueue -> worker claim)",
        "queue_overhead",
        q["p50_ms"],
        q["p99_ms"],
        q["max_ms"],
        q["jobs"],
    )
    if "poll_sweep" in res:
        held = [st["rate"] for st in res["poll_sweep"]["steps"] if st["poll_p99_ms"] < args.p99_ms]
        for st in res["poll_sweep"]["steps"]:
            log.info(
                "polls %6.0f/s + creates %.1f/s   poll p50 %7.2f ms  p99 %7.2f ms   create p99 %s ms   "
                "API CPU %s cores   %s",
                st["rate"],
                args.create_rate,
                st["poll_p50_ms"],
                st["poll_p99_ms"],
                st["create_p99_ms"],
                st["api_cpu"],
                st["statuses"],
            )
        log.info(
            "highest poll rate with p99 < %.0f ms: %s", args.p99_ms, f"{max(held):.0f}/s" if held else "none"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
