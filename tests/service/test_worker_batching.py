"""Batching across requests and the worker's precision setting, against the real stack (uvicorn + PostgreSQL + Redis
+ Celery workers). A stack of its own: jobs are queued while no worker runs, then one worker takes them."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from db_probe import connect, job_rows, wait_final
from PIL import Image
from service_stack import API_KEY, OTHER_KEY, ROOT, Stack, own_database, stack_env

from hdm_core.config import MAX_SEED

SMALL = {"width": 32, "height": 32, "steps": 3, "guidance_scale": 3.0}
PROMPTS = [
    "a red circle",
    "a blue square",
    "a green circle",
    "a black circle",
]  # three tokens each: one forward


@pytest.fixture(scope="module")
def bstack(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("batch-stack")
    with own_database(pg_admin) as url:
        s = Stack(stack_env(tmp, assets, url, redis_url, queue_prefix + "b"), tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            yield s
        finally:
            s.stop()


def _post(s: Stack, prompt: str, seed: int, key: str = API_KEY, **kw: Any) -> str:
    with s.client(key) as c:
        r = c.post("/v1/images", json={"prompt": prompt, "seed": seed, **SMALL, **kw})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def _events(s: Stack, job_id: str) -> list[dict[str, Any]]:
    with s.client() as c:
        return list(c.get(f"/v1/images/{job_id}/events").json()["data"])


def _batch_of(s: Stack, job_id: str) -> dict[str, Any]:
    (log,) = [e["data"] for e in _events(s, job_id) if e["type"] == "log" and "batch_id" in e["data"]]
    return log


def _pixels(s: Stack, job_id: str, index: int = 0) -> tuple[np.ndarray, str]:
    with s.client() as c:
        r = c.get(f"/v1/images/{job_id}/files/{index}")
        assert r.status_code == 200
        img = Image.open(io.BytesIO(r.content))
        return np.asarray(img.convert("RGB"), dtype=np.int16), img.text["parameters"]


def _run_queued(s: Stack, job_ids: list[str], env: dict[str, str], timeout: float = 120) -> None:
    worker = s.start_worker(0, extra_env=env)
    try:
        wait_final(s.env["HDM_DATABASE_URL"], job_ids, timeout=timeout * len(job_ids))
    finally:
        s.kill_worker(worker, sig=15)


def test_queued_jobs_run_as_one_batch_and_equal_jobs_run_alone(bstack: Stack) -> None:
    s = bstack
    ids = [_post(s, p, seed=100 + 10 * i, n=1 + i % 2) for i, p in enumerate(PROMPTS)]
    _run_queued(s, ids, {"HDM_MAX_BATCH": "4"})
    batches = [_batch_of(s, j) for j in ids]
    assert {b["batch_id"] for b in batches} == {batches[0]["batch_id"]}, batches
    assert all(b["batch_size"] == 4 and b["dtype"] == "fp32" for b in batches)
    with s.client() as c:
        done = [c.get(f"/v1/images/{j}").json() for j in ids]
    assert all(d["status"] == "succeeded" for d in done), done
    for d in done:  # each job its own progress events, up to the last step
        steps = [e["data"]["step"] for e in _events(s, d["id"]) if e["type"] == "progress"]
        assert steps[-1] == SMALL["steps"] and steps == sorted(steps), steps

    # the same jobs again, one at a time (no batching): the same pixels (a batch only reorders float sums)
    alone = [_post(s, p, seed=100 + 10 * i, n=1 + i % 2) for i, p in enumerate(PROMPTS)]
    _run_queued(s, alone, {"HDM_MAX_BATCH": "1"})
    assert all(_batch_of(s, j)["batch_size"] == 1 for j in alone)
    for i, (a, b) in enumerate(zip(ids, alone, strict=True)):
        for k in range(1 + i % 2):
            pa, params_a = _pixels(s, a, k)
            pb, params_b = _pixels(s, b, k)
            assert np.abs(pa - pb).max() <= 1, (i, k)
            assert params_a == params_b and f"Seed: {100 + 10 * i + k}" in params_a
    assert np.abs(_pixels(s, ids[0])[0] - _pixels(s, ids[2])[0]).max() > 10  # seeds and prompts matter


def test_cancel_of_one_job_leaves_the_batch_running(bstack: Stack) -> None:
    s = bstack
    long = {"steps": 120}
    ids = [_post(s, p, seed=7 + i, **long) for i, p in enumerate(PROMPTS)]
    worker = s.start_worker(0, extra_env={"HDM_MAX_BATCH": "4"})
    try:
        s.wait_job(ids[1], statuses=("running",), timeout=90, pred=lambda j: j["progress"]["step"] >= 2)
        with s.client() as c:
            assert c.post(f"/v1/images/{ids[1]}/cancel").status_code in (200, 202)
        results = {j: s.wait_job(j, timeout=180) for j in ids}
    finally:
        s.kill_worker(worker, sig=15)
    assert results[ids[1]]["status"] == "cancelled"
    assert results[ids[1]]["progress"]["step"] < long["steps"]
    for j in (ids[0], ids[2], ids[3]):
        assert results[j]["status"] == "succeeded", results[j]
        assert len(results[j]["images"]) == 1
    assert len({_batch_of(s, j)["batch_id"] for j in ids}) == 1


def test_the_largest_seed_runs_and_a_job_that_cannot_run_fails_alone(bstack: Stack) -> None:
    s = bstack
    db = s.env["HDM_DATABASE_URL"]
    # the largest seed the API accepts, from one key, queued with seven jobs of another key: one batch, all succeed
    top = _post(s, PROMPTS[0], seed=MAX_SEED)
    others = [_post(s, PROMPTS[i % 4], seed=300 + i, key=OTHER_KEY) for i in range(7)]
    _run_queued(s, [top, *others], {"HDM_MAX_BATCH": "8"})
    rows = job_rows(db, [top, *others])
    assert all(r.status == "succeeded" for r in rows), rows
    assert len({r.batch_id for r in rows}) == 1 and rows[0].batch_size == 8
    assert f"Seed: {MAX_SEED}" in _pixels(s, top)[1]

    # a job that cannot sample (its second image would need seed 2^63: a row written before the API's rule), queued
    # first: it fails alone, before any companion joins it; the other key's seven jobs run as one batch
    bad = _post(s, PROMPTS[0], seed=MAX_SEED - 1, n=2)
    with connect(db) as conn:
        conn.execute(
            "UPDATE jobs SET request = (request::jsonb || jsonb_build_object('seed', %s::bigint))::json WHERE id = %s",
            (MAX_SEED, bad),
        )
    others = [_post(s, PROMPTS[i % 4], seed=400 + i, key=OTHER_KEY) for i in range(7)]
    _run_queued(s, [bad, *others], {"HDM_MAX_BATCH": "8"})
    failed, *rows = job_rows(db, [bad, *others])
    assert failed.status == "failed" and failed.error is not None, failed
    assert failed.error["code"] == "invalid_request" and "seed must be in" in failed.error["message"], failed
    assert all(r.status == "succeeded" and r.attempts == 1 for r in rows), rows
    assert len({r.batch_id for r in rows}) == 1 and rows[0].batch_size == 7


def test_token_budget_splits_the_queue_in_arrival_order(bstack: Stack) -> None:
    s = bstack
    # 32x32 px on the pixel model (2 px per token): 256 patches + 3 prompt tokens, and 256 + 0 for the empty
    # negative prompt (CFG): 515 tokens per job, so a budget of 1600 takes three jobs per forward
    ids = [_post(s, PROMPTS[i % 4], seed=500 + i, key=(API_KEY, OTHER_KEY)[i % 2]) for i in range(8)]
    _run_queued(s, ids, {"HDM_MAX_BATCH": "8", "HDM_BATCH_TOKENS": "1600"})
    rows = job_rows(s.env["HDM_DATABASE_URL"], ids)
    assert all(r.status == "succeeded" for r in rows), rows
    batches = [r.batch_id for r in rows]
    assert batches == [batches[0]] * 3 + [batches[3]] * 3 + [batches[6]] * 2, batches
    assert len(set(batches)) == 3 and [r.batch_size for r in rows] == [3] * 6 + [2] * 2


def test_worker_samples_in_hdm_dtype_bf16(bstack: Stack) -> None:
    s = bstack
    job = _post(s, "a red circle", seed=3)
    _run_queued(s, [job], {"HDM_DTYPE": "bf16"})
    with s.client() as c:
        done = c.get(f"/v1/images/{job}").json()
    assert done["status"] == "succeeded", done
    assert _batch_of(s, job)["dtype"] == "bf16"
    pixels, params = _pixels(s, job)
    assert "Dtype: bf16" in params and pixels.std() > 1  # an image, not a constant


def test_invalid_hdm_dtype_is_refused_at_start(bstack: Stack) -> None:
    env = {**bstack.env, "HDM_DTYPE": "fp64", "HDM_GPU_INDEX": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.embedded"],
        env={**env, "HDM_BROKER_URL": "db://"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "HDM_DTYPE must be one of auto, fp32, bf16, fp16; got 'fp64'" in proc.stderr
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"],
        env={**env, "HDM_COMPILE": "fastest"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "HDM_COMPILE must be one of" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_worker_compiled_network_equals_eager(bstack: Stack) -> None:
    s = bstack
    eager = _post(s, "a blue square", seed=21, n=2)
    _run_queued(s, [eager], {"HDM_MAX_BATCH": "1"})
    compiled = _post(s, "a blue square", seed=21, n=2)
    _run_queued(s, [compiled], {"HDM_MAX_BATCH": "1", "HDM_COMPILE": "default"}, timeout=300)
    with s.client() as c:
        done = c.get(f"/v1/images/{compiled}").json()
    assert done["status"] == "succeeded", done
    assert done["timings"]["compile_s"] > 0  # the warm-up compiled this shape before sampling
    for k in range(2):
        assert np.abs(_pixels(s, compiled, k)[0] - _pixels(s, eager, k)[0]).max() <= 1


def test_cli_generate_takes_hdm_dtype(bstack: Stack, assets: dict[str, Path], tmp_path: Path) -> None:
    args = [sys.executable, "-m", "app.cli", "generate", "a red circle", "--model", str(assets["model"])]
    args += ["--width", "32", "--height", "32", "--steps", "2", "--seed", "5", "--device", "cpu"]
    outputs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        env = {**bstack.env, "HDM_DTYPE": dtype}
        proc = subprocess.run([*args, "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        img = Image.open(out / "5.png")
        assert f"Dtype: {dtype}" in img.text["parameters"]
        outputs[dtype] = np.asarray(img.convert("RGB"), dtype=np.int16)
    # bf16 rounds every matmul input: close to fp32, not equal (the setting reached the model)
    diff = np.abs(outputs["bf16"] - outputs["fp32"])
    assert diff.max() > 0 and diff.mean() < 8
