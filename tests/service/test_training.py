"""Datasets and train jobs through the real stack: validation job, torchrun trainer subprocess group supervised by
the worker (metrics -> events, checkpoints -> models), cancel frees the slot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image
from service_stack import Stack

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


def _make_dataset(root: Path, n: int = 16) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        name = names[i % len(names)]
        Image.new("RGB", (32, 32), COLORS[name]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {name} square")
    Image.new("RGB", (32, 32)).save(root / "nocaption.png")
    (root / "broken.png").write_bytes(b"not a png")


@pytest.fixture(scope="module")
def dataset_id(stack: Stack) -> str:
    if not any(p.poll() is None for p in stack.workers):
        stack.start_worker(0)
    data_root = Path(stack.env["HDM_DATA_ROOT"])
    _make_dataset(data_root / "squares")
    with stack.client() as c:
        r = c.post("/v1/datasets", json={"name": "squares", "path": "squares"})
        assert r.status_code == 202, r.text
        ds = r.json()
        assert ds["id"].startswith("ds_") and ds["status"] == "validating"
        deadline = time.monotonic() + 60
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    stats = ds["stats"]
    assert stats["images"] == 18 and stats["captioned"] == 16
    assert stats["unreadable"] == ["broken.png"] and "nocaption.png" in stats["missing_captions"]
    return str(ds["id"])


def _train_body(dataset: str, steps: int, **kw: object) -> dict:
    return {
        "name": "squares",
        "arch": "xut-pixel-debug",
        "dataset": dataset,
        "precision": "fp32",
        "seed": 1,
        "checkpoint_every": 4,
        "keep_last_n": 2,
        "stages": [
            {
                "resolution": 16,
                "steps": steps,
                "batch_size": 4,
                "lr": 1e-3,
                "warmup_steps": 0,
                "caption_dropout": 0.1,
            }
        ],
        **kw,
    }


def test_train_job_runs_trainer_and_registers_checkpoints(live_worker: Stack, dataset_id: str) -> None:
    s = live_worker
    with s.client() as c:
        r = c.post("/v1/train-jobs", json=_train_body(dataset_id, 8, text_max_length=16))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["id"].startswith("train_") and job["status"] == "queued" and job["total_steps"] == 8
        done = s.wait_job(job["id"], timeout=240, path="/v1/train-jobs")
        assert done["status"] == "succeeded", (done, s.logs())
        assert done["step"] == 8 and done["gpus"] == [0]
        config = (Path(s.env["HDM_RUNS_DIR"]) / job["id"] / "config.toml").read_text()
        assert "max_length = 16" in config, config
        assert done["metrics"]["loss"] is not None and done["metrics"]["lr"] is not None
        metrics = [
            e for e in c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"] if e["type"] == "metrics"
        ]
        assert [m["data"]["step"] for m in metrics][-1] == 8 and all("loss" in m["data"] for m in metrics)
        ckpts = c.get(f"/v1/train-jobs/{job['id']}/checkpoints").json()["data"]
        assert {k["step"] for k in ckpts} >= {8}
        assert all(k["source"] == "train_job" and k["train_job"] == job["id"] for k in ckpts)
        # a checkpoint the run wrote serves images right away
        img = c.post(
            "/v1/images",
            json={"prompt": "a red square", "model": ckpts[-1]["id"], "width": 32, "height": 32, "steps": 2},
            headers={"Prefer": "wait=60"},
        )
        assert img.status_code == 200 and img.json()["status"] == "succeeded", img.text


def test_train_cancel_frees_the_slot(live_worker: Stack, dataset_id: str) -> None:
    s = live_worker
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_train_body(dataset_id, 100000, checkpoint_every=100000)).json()
        s.wait_job(job["id"], ("running",), timeout=120, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        assert c.get("/v1/system").json()["gpus"][0]["job"] == job["id"]
        t0 = time.monotonic()
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        done = s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")
        assert done["status"] == "cancelled" and time.monotonic() - t0 < 30
        assert c.get("/v1/system").json()["gpus"][0]["job"] is None
        nxt = c.post(
            "/v1/images",
            json={"prompt": "after training", "width": 32, "height": 32, "steps": 2},
            headers={"Prefer": "wait=60"},
        )
        assert nxt.json()["status"] == "succeeded"
        r = c.post(f"/v1/train-jobs/{job['id']}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued"
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        assert s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")["status"] == "cancelled"


def test_train_job_validation(stack: Stack, dataset_id: str) -> None:
    with stack.client() as c:
        bad = [
            ({**_train_body(dataset_id, 8), "dataset": "ds_missing"}, "dataset"),
            ({**_train_body(dataset_id, 8), "gpus": 4}, "gpus"),
            ({**_train_body(dataset_id, 8), "nodes": 2}, "nodes"),
            ({**_train_body(dataset_id, 8), "arch": "xut-huge"}, "arch"),
            ({**_train_body(dataset_id, 8), "stages": []}, "stages"),
            ({**_train_body(dataset_id, 8), "precision": "fp8"}, "precision"),
            ({**_train_body(dataset_id, 8), "text_max_length": 0}, "text_max_length"),
            ({**_train_body(dataset_id, 8), "text_max_length": 1025}, "text_max_length"),
            ({**_train_body(dataset_id, 8), "t_logit_std": 0}, "t_logit_std"),
            ({**_train_body(dataset_id, 8), "arch": {"in_channels": 3, "dim": 100, "heads": 3}}, "arch"),
            ({**_train_body(dataset_id, 8), "arch": {"in_channels": 3, "depht": 2}}, "arch"),
            ({**_train_body(dataset_id, 8), "t_logit_mean": 9}, "t_logit_mean"),
        ]
        for body, param in bad:
            r = c.post("/v1/train-jobs", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"] == param, (param, r.text)
        r = c.post(
            "/v1/train-jobs", json={**_train_body(dataset_id, 8), "stages": [{"resolution": 16, "lr": 1e-3}]}
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "stages.0", r.text


def test_worker_sigterm_preempts_training_which_resumes(live_worker: Stack, dataset_id: str) -> None:
    """Warm shutdown (SIGTERM to the worker, as docker stop does): the run goes back to the queue and the next
    worker resumes it from its newest checkpoint."""
    import signal

    s = live_worker
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_train_body(dataset_id, 100000, checkpoint_every=3)).json()
        s.wait_job(
            job["id"],
            ("running",),
            timeout=120,
            path="/v1/train-jobs",
            pred=lambda j: len(j["checkpoints"]) >= 1 and j["step"] >= 4,
        )
        worker = next(p for p in s.workers if p.poll() is None)
        worker.send_signal(signal.SIGTERM)  # the main process only, like tini/docker
        worker.wait(timeout=60)
        s.workers.remove(worker)
        queued = c.get(f"/v1/train-jobs/{job['id']}").json()
        assert queued["status"] == "queued", queued
        reasons = [
            e["data"].get("reason")
            for e in c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"]
            if e["type"] == "status"
        ]
        assert reasons[-1] == "worker_shutdown"
        n_before = len(c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"])
        s.start_worker(0)
        s.wait_job(
            job["id"], ("running",), timeout=120, path="/v1/train-jobs", pred=lambda j: j["attempts"] == 2
        )
        deadline = time.monotonic() + 90
        while True:
            events = c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"][n_before:]
            resumed = [e["data"]["step"] for e in events if e["type"] == "metrics"]
            if resumed:
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        assert s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")["status"] == "cancelled"
        saved = {k["step"] for k in c.get(f"/v1/train-jobs/{job['id']}/checkpoints").json()["data"]}
        # continued right after a checkpoint the first attempt wrote, not from step 1; no step reported twice
        assert resumed[0] > 1 and resumed[0] - 1 in saved, (resumed, saved)
        assert resumed == list(range(resumed[0], resumed[0] + len(resumed))), resumed


ENV_TRAINER = """
import json, os, sys
from pathlib import Path
run = Path(sys.argv[sys.argv.index("--run-dir") + 1])
(run / "env.json").write_text(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "nproc": sys.argv[1]}))
with (run / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"step": 1, "loss": 0.5, "lr": 1e-3}) + "\\n")
"""


def test_trainer_service_runs_train_jobs_on_the_leased_gpus(
    stack: Stack, dataset_id: str, tmp_path: Path
) -> None:
    """The compose layout's code path on CPU: `hdm worker --trainer` (no HDM_GPU_INDEX, all GPUs visible) consumes
    hdm.train.<slot> and gives torchrun CUDA_VISIBLE_DEVICES = the leased slots. A stand-in trainer records its
    environment (HDM_DEVICE=cuda only decides the variables here; nothing touches a GPU)."""
    import signal

    script = tmp_path / "env_trainer.py"
    script.write_text(ENV_TRAINER)
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    stack.start_worker(
        trainer=True,
        extra_env={
            "HDM_TRAIN_COMMAND": f"{{python}} {script} {{nproc}} {{config}} --run-dir {{run_dir}}",
            "HDM_DEVICE": "cuda",
        },
    )
    try:
        with stack.client() as c:
            job = c.post("/v1/train-jobs", json=_train_body(dataset_id, 1)).json()
            done = stack.wait_job(job["id"], timeout=60, path="/v1/train-jobs")
            assert done["status"] == "succeeded", (done, stack.logs())
            env = json.loads((Path(stack.env["HDM_RUNS_DIR"]) / job["id"] / "env.json").read_text())
            assert env == {"cuda": "0", "nproc": "1"}, env
            assert done["gpus"] == [0]
            assert c.get("/v1/system").json()["gpus"][0]["job"] is None
    finally:
        for p in list(stack.workers):
            stack.kill_worker(p, signal.SIGTERM)
        stack.start_worker(0)


STUBBORN_TRAINER = """
import json, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer that ignores the polite stop
run = Path(sys.argv[sys.argv.index("--run-dir") + 1])
run.mkdir(parents=True, exist_ok=True)
step = 0
while True:
    step += 1
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\\n")
    time.sleep(0.2)
"""


def test_cancel_forces_a_trainer_that_ignores_sigterm(stack: Stack, dataset_id: str, tmp_path: Path) -> None:
    """Stand-in trainer (HDM_TRAIN_COMMAND): cooperative SIGTERM first, then SIGKILL of the process group."""
    import signal

    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_TRAINER)
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    stack.start_worker(
        0,
        extra_env={
            "HDM_TRAIN_COMMAND": f"{{python}} {script} {{config}} --run-dir {{run_dir}}",
            "HDM_TRAIN_KILL_GRACE_S": "2",
        },
    )
    try:
        with stack.client() as c:
            job = c.post("/v1/train-jobs", json=_train_body(dataset_id, 1000)).json()
            stack.wait_job(
                job["id"], ("running",), timeout=60, path="/v1/train-jobs", pred=lambda j: j["step"] >= 2
            )
            t0 = time.monotonic()
            c.post(f"/v1/train-jobs/{job['id']}/cancel")
            done = stack.wait_job(job["id"], timeout=30, path="/v1/train-jobs")
            assert done["status"] == "cancelled"
            assert 2 <= time.monotonic() - t0 < 15  # not before the grace period, not much after
            assert c.get("/v1/system").json()["gpus"][0]["job"] is None
            log = (Path(stack.env["HDM_RUNS_DIR"]) / job["id"] / "metrics.jsonl").read_text().splitlines()
            time.sleep(1)  # the group is dead: nothing writes any more
            assert (
                Path(stack.env["HDM_RUNS_DIR"]) / job["id"] / "metrics.jsonl"
            ).read_text().splitlines() == log
    finally:
        for p in list(stack.workers):
            stack.kill_worker(p, signal.SIGTERM)
        stack.start_worker(0)
