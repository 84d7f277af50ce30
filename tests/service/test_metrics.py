"""/metrics scraped while jobs run: the API's (HTTP latency histograms, queue gauges from the job table) and a
worker's own endpoint (job run time and queue wait per kind, images/s, batch size, model-cache use, train steps/s),
both parsed with prometheus_client.parser. worker/metrics.py and app/metrics.py define them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from service_stack import ADMIN_KEY, Stack, free_port


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, name: str, **labels: str) -> list:
    return [
        s for f in fams.values() for s in f.samples if s.name == name and labels.items() <= s.labels.items()
    ]


@pytest.fixture(scope="module")
def worker_port(stack: Stack) -> int:
    """The stack's worker, restarted with its metrics endpoint on a free port."""
    for proc in stack.workers:
        if proc.poll() is None:
            stack.kill_worker(proc)
            proc.wait(timeout=30)
    port = free_port()
    stack.start_worker(0, extra_env={"HDM_WORKER_METRICS_PORT": str(port)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200:
                return port
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail(f"worker metrics endpoint on :{port} never answered\n{stack.logs()}")


def _dataset(stack: Stack) -> str:
    root = Path(stack.env["HDM_DATA_ROOT"]) / "metrics-squares"
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220)}.items()):
        for j in range(2):
            Image.new("RGB", (32, 32), rgb).save(root / f"{i}{j}.png")
            (root / f"{i}{j}.txt").write_text(f"a {name} square")
    with stack.client() as c:
        ds = c.post("/v1/datasets", json={"name": "metrics-squares", "path": "metrics-squares"}).json()
        deadline = time.monotonic() + 60
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    return str(ds["id"])


def test_metrics_scraped_during_a_run_with_jobs(stack: Stack, worker_port: int) -> None:
    dataset = _dataset(stack)
    with stack.client() as c:
        ids = []
        for seed in (1, 2):  # the second finds the pipeline cached
            r = c.post(
                "/v1/images",
                json={"prompt": "a red square", "width": 32, "height": 32, "steps": 2, "n": 2, "seed": seed},
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            stack.wait_job(ids[-1], timeout=120)
        train = c.post(
            "/v1/train-jobs",
            json={
                "name": "metrics",
                "arch": "xut-pixel-debug",
                "dataset": dataset,
                "precision": "fp32",
                "seed": 1,
                "stages": [{"resolution": 16, "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}],
            },
        )
        assert train.status_code == 202, train.text
        c.get(f"/v1/images/{ids[0]}")  # one more templated route
    assert all(stack.wait_job(i)["status"] == "succeeded" for i in ids)
    done = stack.wait_job(train.json()["id"], path="/v1/train-jobs", timeout=300)
    assert done["status"] == "succeeded", done

    with stack.client(key=ADMIN_KEY) as admin:
        r = admin.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    api = families(r.text)
    assert api["hdm_http_request_duration_seconds"].type == "histogram"
    by_route = samples(
        api, "hdm_http_request_duration_seconds_bucket", method="GET", route="/v1/images/{job_id}"
    )
    inf = [s for s in by_route if s.labels["le"] == "+Inf"]
    assert inf and inf[0].value >= 3, by_route  # the waits polled it, plus the explicit GET
    assert len({s.labels["le"] for s in by_route}) > 5
    routes = {s.labels["route"] for s in samples(api, "hdm_http_requests_total")}
    assert not any(i in route for route in routes for i in ids), routes  # templates, never raw ids
    assert samples(api, "hdm_jobs", kind="image", status="succeeded")[0].value >= 2
    assert {s.labels["kind"] for s in samples(api, "hdm_queue_depth")} >= {"image", "train", "dataset"}
    assert samples(api, "hdm_jobs_running", kind="train")[0].value == 0

    text = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
    w = families(text)
    assert w["hdm_job_run_seconds"].type == "histogram"
    for kind in ("image", "train", "dataset"):
        count = samples(w, "hdm_job_run_seconds_count", kind=kind)
        assert count and count[0].value >= 1, (kind, count)
        assert samples(w, "hdm_job_queue_wait_seconds_count", kind=kind)[0].value >= 1
    image_buckets = samples(w, "hdm_job_run_seconds_bucket", kind="image")
    assert next(s for s in image_buckets if s.labels["le"] == "+Inf").value >= 2
    assert samples(w, "hdm_worker_images_total")[0].value >= 4  # two jobs of n=2
    assert samples(w, "hdm_worker_images_per_second")[0].value > 0
    assert samples(w, "hdm_worker_batch_size_count")[0].value >= 2
    assert samples(w, "hdm_worker_model_cache_total", result="load")[0].value >= 1
    assert samples(w, "hdm_worker_model_cache_total", result="hit")[0].value >= 1
    assert samples(w, "hdm_worker_train_steps_per_second")[0].value > 0
    assert samples(w, "hdm_jobs_finished_total", kind="train", status="succeeded")[0].value == 1
