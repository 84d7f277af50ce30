"""Batching across requests through the real worker: images/s for a queue of 8 small jobs, run one at a time
(HDM_MAX_BATCH=1) vs taken as one batch (HDM_MAX_BATCH=8).

    python -m bench.batch [--jobs 8] [--size 64] [--steps 8] [--rounds 2]

Its own stack (bench.api.OwnStack: PostgreSQL database, Redis, uvicorn, one Celery worker, the tiny pixel model). Per
round and mode the jobs are queued while no worker runs, then one worker starts; the time is first job started ->
last job finished, less the model load of the first job (the same in both modes). Prints the median of each mode and
the ratio. On a CPU the network is compute-bound already at batch 1, so the ratio says how much per-job overhead
(Python, small matmuls, DB writes) a batch removes; on a GPU a batch fills the device."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from datetime import datetime

import httpx

from bench.api import OwnStack

log = logging.getLogger("bench.batch")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def one_round(stack: OwnStack, max_batch: int, jobs: int, size: int, steps: int) -> float:
    """Seconds for the queue of ``jobs`` jobs (model load excluded)."""
    body = {"width": size, "height": size, "steps": steps, "guidance_scale": 3.0}
    headers = {"Authorization": f"Bearer {stack.key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as c:
        ids = [
            c.post("/v1/images", json={"prompt": f"bench job {i}", "seed": i, **body}).json()["id"]
            for i in range(jobs)
        ]
        stack.env["HDM_MAX_BATCH"] = str(max_batch)
        stack.start_worker()
        try:
            deadline = time.monotonic() + 600
            while True:
                done = [c.get(f"/v1/images/{j}").json() for j in ids]
                if all(d["status"] in ("succeeded", "failed", "cancelled") for d in done):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jobs did not finish: {[d['status'] for d in done]}")
                time.sleep(0.2)
        finally:
            stack.close_worker()
    bad = [d for d in done if d["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[0]}")
    first = min(done, key=lambda d: _ts(d["started_at"]))
    span = max(_ts(d["finished_at"]) for d in done) - _ts(first["started_at"])
    return span - (first["timings"]["load_s"] or 0.0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    stack = OwnStack()
    times: dict[int, list[float]] = {1: [], args.jobs: []}
    try:
        for _ in range(args.rounds):
            for mb in times:  # alternate, so a change in machine load hits both modes
                times[mb].append(one_round(stack, mb, args.jobs, args.size, args.steps))
    finally:
        stack.close()
    seq, bat = (args.jobs / statistics.median(times[k]) for k in times)
    out = {
        "jobs": args.jobs,
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "sequential_img_s": round(seq, 3),
        "batched_img_s": round(bat, 3),
        "ratio": round(bat / seq, 3),
        "seconds": {str(k): [round(t, 3) for t in v] for k, v in times.items()},
    }
    print(
        f"worker batching, {args.jobs} queued jobs ({args.size}px, {args.steps} steps, CFG, real stack): one at a time "
        f"{seq:.2f} img/s, HDM_MAX_BATCH={args.jobs} {bat:.2f} img/s, ratio {bat / seq:.2f}x"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
