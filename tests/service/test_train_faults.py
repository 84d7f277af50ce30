"""Train jobs under faults, against the real stack (uvicorn API + PostgreSQL + Redis + Celery worker + torchrun):
issue 10, items 3 (supervisor error), 4 (SIGTERM saves), 17 (metrics after a SIGKILL at a checkpoint) and 18
(resume keeps attempts)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from service_stack import Stack

# A stand-in trainer (HDM_TRAIN_COMMAND) whose behaviour the job's seed picks.
STAND_IN = """
import json, sys, time, tomllib
from pathlib import Path
cfg = tomllib.loads(Path(sys.argv[1]).read_text())
run = Path(sys.argv[sys.argv.index("--run-dir") + 1])
if cfg["seed"] == 102:
    sys.exit(3)  # a trainer that fails at once
step = 0
while True:  # seed 101: a line the supervisor cannot use, then more training
    step += 1
    with (run / "metrics.jsonl").open("a") as f:
        rec = {"step": "bogus" if step == 3 else step, "loss": 1.0 / step, "lr": 1e-3}
        f.write(json.dumps(rec) + "\\n")
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def dataset(stack: Stack) -> str:
    if not any(p.poll() is None for p in stack.workers):
        stack.start_worker(0)
    root = Path(stack.env["HDM_DATA_ROOT"]) / "faults"
    root.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(220, 30, 30), (30, 30, 220)] * 4):
        Image.new("RGB", (32, 32), color).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text("a red square" if i % 2 == 0 else "a blue square")
    with stack.client() as c:
        ds = c.post("/v1/datasets", json={"name": "faults", "path": "faults"}).json()
        deadline = time.monotonic() + 60
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    return str(ds["id"])


@pytest.fixture
def stand_in_worker(stack: Stack, tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    script = tmp_path / "stand_in_trainer.py"
    script.write_text(STAND_IN)
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    stack.start_worker(
        0, extra_env={"HDM_TRAIN_COMMAND": f"{{python}} {script} {{config}} --run-dir {{run_dir}}"}
    )
    try:
        yield stack, script
    finally:
        for pid in _procs_running(str(script)):  # what this test started, if a failure left it behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in list(stack.workers):
            stack.kill_worker(p, signal.SIGTERM)
        stack.start_worker(0)


def _procs_running(needle: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (d / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z" and needle in (d / "cmdline").read_bytes().decode(
                    errors="replace"
                ):
                    out.append(int(d.name))
    return out


def _body(dataset: str, steps: int, **kw: object) -> dict[str, Any]:
    return {
        "name": "faults",
        "arch": "xut-pixel-debug",
        "dataset": dataset,
        "precision": "fp32",
        "seed": 1,
        "checkpoint_every": 4,
        "keep_last_n": 2,
        "stages": [{"resolution": 16, "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}],
        **kw,
    }


def _metric_steps(c: Any, job_id: str) -> list[int]:
    out: list[int] = []
    after = 0
    while True:
        page = c.get(f"/v1/train-jobs/{job_id}/events", params={"after": after}).json()["data"]
        if not page:
            return out
        out += [e["data"]["step"] for e in page if e["type"] == "metrics"]
        after = page[-1]["id"]


def test_supervisor_error_kills_the_trainer_and_frees_the_slot(
    stand_in_worker: tuple[Stack, Path], dataset: str
) -> None:
    """Item 3: the supervisor raises (here on a metrics line with a non-numeric step): the job fails at once, its
    trainer is gone and its slot free, and no second trainer is started into the same run folder."""
    s, script = stand_in_worker
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_body(dataset, 1000, seed=101)).json()
        deadline = time.monotonic() + 60
        while (cur := c.get(f"/v1/train-jobs/{job['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, (cur, _procs_running(str(script)), s.logs())
            time.sleep(0.2)
        assert cur["status"] == "failed" and cur["error"]["code"] == "supervisor_error", cur
        assert cur["attempts"] == 1, cur
        deadline = time.monotonic() + 5
        while alive := _procs_running(str(script)):
            assert time.monotonic() < deadline, f"trainer still running after the supervisor failed: {alive}"
            time.sleep(0.1)
        assert c.get("/v1/system").json()["gpus"][0]["job"] is None
        time.sleep(2 * float(s.env["HDM_STALE_AFTER_S"]))  # maintenance had time to (wrongly) re-queue it
        assert c.get(f"/v1/train-jobs/{job['id']}").json()["status"] == "failed"
        assert not _procs_running(str(script))


def test_resume_keeps_the_attempt_count(stand_in_worker: tuple[Stack, Path], dataset: str) -> None:
    """Item 18: resume does not reset `attempts` (the count of starts, the max-attempts budget and the token that
    lets only the current attempt finish the job)."""
    s, _ = stand_in_worker
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_body(dataset, 10, seed=102)).json()
        first = s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")
        assert first["status"] == "failed" and first["error"]["code"] == "trainer_failed", first
        assert first["attempts"] == 1, first
        r = c.post(f"/v1/train-jobs/{job['id']}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        assert r.json()["attempts"] == 1, r.json()
        again = s.wait_job(job["id"], timeout=60, path="/v1/train-jobs", pred=lambda j: j["attempts"] >= 2)
        assert again["status"] == "failed" and again["attempts"] == 2, again


def test_metrics_events_complete_after_sigkill_as_a_checkpoint_lands(
    live_worker: Stack, dataset: str
) -> None:
    """Item 17: the worker (and with it the supervisor) is SIGKILLed the moment the trainer's first checkpoint
    lands, before the supervisor read the newest metrics lines. After the restart and resume, every step has
    exactly one metrics event."""
    s = live_worker
    steps = 12
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_body(dataset, steps)).json()
        manifest = Path(s.env["HDM_RUNS_DIR"]) / job["id"] / "checkpoints" / "manifest.json"
        deadline = time.monotonic() + 180
        while not manifest.is_file():
            assert time.monotonic() < deadline, s.logs()
            cur = c.get(f"/v1/train-jobs/{job['id']}").json()
            assert cur["status"] in ("queued", "running"), cur
            time.sleep(0.005)
        for p in list(s.workers):
            s.kill_worker(p, signal.SIGKILL)
        s.start_worker(0)
        done = s.wait_job(job["id"], timeout=240, path="/v1/train-jobs")
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done, s.logs())
        assert _metric_steps(c, job["id"]) == list(range(1, steps + 1))


def test_worker_sigterm_saves_the_step_it_was_in(live_worker: Stack, dataset: str) -> None:
    """Item 4: warm shutdown preempts the run with SIGTERM; with checkpoints far apart the trainer still saves the
    step it reached before exiting, and the run resumes after it."""
    s = live_worker
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_body(dataset, 100000, checkpoint_every=100000)).json()
        running = s.wait_job(
            job["id"], ("running",), timeout=120, path="/v1/train-jobs", pred=lambda j: j["step"] >= 3
        )
        worker = next(p for p in s.workers if p.poll() is None)
        worker.send_signal(signal.SIGTERM)  # the main process only, like docker stop
        worker.wait(timeout=60)
        s.workers.remove(worker)
        queued = c.get(f"/v1/train-jobs/{job['id']}").json()
        assert queued["status"] == "queued", queued
        manifest = Path(s.env["HDM_RUNS_DIR"]) / job["id"] / "checkpoints" / "manifest.json"
        assert manifest.is_file(), "the preempted trainer saved no checkpoint"
        saved = [e["step"] for e in json.loads(manifest.read_text())["checkpoints"]]
        logged = _metric_steps(c, job["id"])
        assert saved == [logged[-1]] and saved[0] >= running["step"], (saved, logged)
        s.start_worker(0)
        s.wait_job(
            job["id"], ("running",), timeout=120, path="/v1/train-jobs", pred=lambda j: j["step"] > saved[0]
        )
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        assert s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")["status"] == "cancelled"
        steps = _metric_steps(c, job["id"])
        assert steps == list(range(1, len(steps) + 1)), steps  # resumed after the saved step, none twice
