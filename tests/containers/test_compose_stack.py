"""docker-compose.yml + docker-compose.cpu.yml built and run for real with podman (podman_stack.py says how and
what it works around on this machine): migrate exits 0, the API turns healthy, workers heartbeat, an image job and
a tiny train job over HTTP succeed with their files in the mounted volumes owned by uid 10001, the workers' metrics
answer inside the compose network only, SIGTERM to the trainer saves and requeues its run, and `down` then `up`
keeps every job, model and image. `make test-containers` runs only this; `make test` runs it with the rest."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from . import podman_stack as ps

log = logging.getLogger(__name__)
pytestmark = pytest.mark.timeout(3000)  # a cold build is ~15 min on two busy cores; warm, a few minutes
UID = 10001
API_KEY, ADMIN_KEY = "key" + secrets.token_hex(8), "admin" + secrets.token_hex(8)
FINAL = ("succeeded", "failed", "cancelled")
SERVICES = (
    "api",
    "worker-0",
    "worker-1",
    "trainer",
)  # after migrate, as docker-compose.yml's depends_on says


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _storage(root: Path) -> dict[str, Path]:
    """Host folders for the four shared volumes, with a tiny model, a toy text encoder and a small dataset."""
    import hdm_core
    from hdm_core.codec import PixelCodec
    from hdm_demo.text_encoder import build_toy_text_encoder

    paths = {name: root / name for name in ("models", "datasets", "outputs", "runs")}
    for p in paths.values():
        p.mkdir(parents=True)
    (paths["models"] / "checkpoints").mkdir()
    model = hdm_core.XUT(hdm_core.PRESETS["xut-pixel-debug"])
    hdm_core.save_checkpoint(paths["models"] / "checkpoints" / "tiny.safetensors", model, codec=PixelCodec())
    build_toy_text_encoder(paths["models"] / "text-encoder")
    squares = paths["datasets"] / "squares"
    squares.mkdir()
    for i, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220)}.items()):
        for j in range(4):
            Image.new("RGB", (32, 32), rgb).save(squares / f"{i}{j}.png")
            (squares / f"{i}{j}.txt").write_text(f"a {name} square")
    ps.run(["chown", "-R", f"{UID}:{UID}", str(root)])  # docs/deployment.md: writable by uid 10001
    return paths


class Stack:
    def __init__(self, compose: ps.Compose, base_url: str, storage: dict[str, Path]) -> None:
        self.compose, self.base_url, self.storage = compose, base_url, storage
        self.notes: dict[str, Any] = {}

    def client(self, key: str = API_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def up(self) -> None:
        """In the order the compose file's depends_on asks for, one tier at a time with --no-deps: podman 4.3
        cannot start a container whose --requires dependency has its own (podman-compose turns depends_on into
        --requires), and podman-compose skips `service_healthy` on podman < 4.6."""
        self.compose("up", "-d", "--no-deps", "postgres", "redis")
        for svc in ("postgres", "redis"):
            ps.wait_for(
                lambda s=svc: self.compose.state(s)["health"] == "healthy",
                120,
                f"{svc} healthy",
                detail=lambda s=svc: self.compose.logs(s),
            )
        self.compose("up", "-d", "--no-deps", "migrate")
        ps.wait_for(lambda: self.compose.state("migrate")["status"] == "exited", 180, "migrate done")
        migrate = self.compose.state("migrate")
        assert migrate["exit_code"] == "0", f"migrate exited {migrate}:\n{self.compose.logs('migrate')}"
        self.compose("up", "-d", "--no-deps", *SERVICES, timeout=900)
        ps.wait_for(
            lambda: self.compose.state("api")["health"] == "healthy",
            240,
            "api healthy",
            detail=self.compose.all_logs,
        )

    def wait_job(
        self, job_id: str, path: str, statuses: tuple[str, ...] = FINAL, timeout: float = 300, pred=None
    ) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        def done() -> dict[str, Any] | None:
            with self.client() as c:
                job = c.get(f"{path}/{job_id}").json()
            return job if job.get("status") in statuses and (pred is None or pred(job)) else None

        return ps.wait_for(done, timeout, f"job {job_id} {statuses}", detail=self.compose.all_logs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ps.install_tools()
    work = tmp_path_factory.mktemp("containers")
    t0 = time.monotonic()
    times = ps.build_images(work / "build.log")
    storage = _storage(work / "storage")
    api_port = free_port()
    env = {
        "COMPOSE_PROJECT_NAME": f"hdmct{secrets.token_hex(4)}",
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "REDIS_PASSWORD": secrets.token_hex(12),
        "HDM_API_KEYS": API_KEY,
        "HDM_ADMIN_KEYS": ADMIN_KEY,
        "HDM_WEBHOOK_SECRET": secrets.token_hex(16),
        "HDM_IMAGE": ps.APP_IMAGE,
        "POSTGRES_IMAGE": ps.STANDINS["postgres"],
        "REDIS_IMAGE": ps.STANDINS["redis"],
        "HDM_API_BIND": "127.0.0.1",
        "HDM_API_PORT": str(api_port),
        "POSTGRES_PORT": str(free_port()),
        "REDIS_PORT": str(free_port()),
        **{f"HDM_{k.upper()}_PATH": str(p) for k, p in storage.items()},
    }
    compose = ps.Compose(work, env)
    s = Stack(compose, f"http://127.0.0.1:{api_port}", storage)
    s.notes.update(build_s={k: round(v) for k, v in times.items()}, image_bytes=ps.image_size(ps.APP_IMAGE))
    try:
        with ps.HealthTicker(compose):
            s.up()
            s.notes["up_s"] = round(time.monotonic() - t0)
            yield s
    except BaseException:
        log.error("container logs:\n%s", compose.all_logs())
        raise
    finally:
        compose.remove_everything()
        log.warning("container test: %s, %.0fs in all", json.dumps(s.notes), time.monotonic() - t0)
        print(f"\ncontainer test: {json.dumps(s.notes)}, {time.monotonic() - t0:.0f}s in all")


def test_migrate_exits_0_and_the_api_turns_healthy(stack: Stack) -> None:
    state = stack.compose.state("migrate")
    assert state["status"] == "exited" and state["exit_code"] == "0", (state, stack.compose.logs("migrate"))
    assert stack.compose.state("api")["health"] == "healthy"
    with stack.client() as c:
        ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["migrations"] is True, ready.text
    for svc in ("worker-0", "worker-1", "trainer"):
        assert stack.compose.state(svc)["status"] == "running", (svc, stack.compose.logs(svc))
    assert not any("worker-2" in n or "worker-3" in n for n in stack.compose.names())  # the CPU override: two


def test_image_and_train_jobs_over_http_write_files_owned_by_10001(stack: Stack) -> None:
    with stack.client() as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["name"] for m in models] == ["tiny"], models
        image = c.post(
            "/v1/images", json={"prompt": "a red square", "width": 32, "height": 32, "steps": 2, "n": 2}
        )
        assert image.status_code == 202, image.text
        ds = c.post("/v1/datasets", json={"name": "squares", "path": "squares"}).json()
        ds = ps.wait_for(
            lambda: (d := c.get(f"/v1/datasets/{ds['id']}").json())["status"] != "validating" and d,
            120,
            "dataset",
        )
        assert ds["status"] == "ready", ds
    job = stack.wait_job(image.json()["id"], "/v1/images")
    assert job["status"] == "succeeded", job
    with stack.client() as c:
        png = c.get(f"/v1/images/{job['id']}/files/0")
        train = c.post("/v1/train-jobs", json=_train(ds["id"], 2))
        assert train.status_code == 202, train.text
        system = c.get("/v1/system").json()
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    heartbeats = [g for g in system["gpus"] if g["heartbeat_at"]]
    assert heartbeats, system  # the worker that ran the job heartbeat on its slot (GET /v1/system)
    done = stack.wait_job(train.json()["id"], "/v1/train-jobs", timeout=600)
    assert done["status"] == "succeeded", done
    outputs = list((stack.storage["outputs"] / job["id"]).iterdir())
    runs = [p for p in (stack.storage["runs"]).rglob("*") if p.is_file()]
    assert len(outputs) == 2 and runs, (outputs, runs)
    for p in [*outputs, *runs]:
        assert (p.stat().st_uid, p.stat().st_gid) == (UID, UID), (p, p.stat().st_uid)
    stack.notes["image_job"], stack.notes["train_job"] = job["id"], done["id"]


def _train(dataset: str, steps: int, **kw: object) -> dict[str, Any]:
    return {
        "name": "squares",
        "arch": "xut-pixel-debug",
        "dataset": dataset,
        "precision": "fp32",
        "seed": 1,
        "checkpoint_every": 2,
        "keep_last_n": 2,
        "stages": [{"resolution": 16, "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}],
        **kw,
    }


def test_metrics_of_the_api_and_of_the_workers_inside_the_network(stack: Stack) -> None:
    with stack.client(ADMIN_KEY) as admin:  # HDM_ADMIN_KEYS reached the container (a pass-through variable)
        r = admin.get("/metrics")
    assert r.status_code == 200, r.text
    api = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert api["hdm_http_request_duration_seconds"].type == "histogram"
    script = "import urllib.request; print(urllib.request.urlopen('http://worker-0:9200/metrics', timeout=5).read().decode())"
    out = stack.compose.podman("exec", stack.compose.container("api"), "python3", "-c", script).stdout
    worker = {f.name: f for f in text_string_to_metric_families(out)}
    assert worker["hdm_job_run_seconds"].type == "histogram" and "hdm_worker_images" in worker
    ports = stack.compose.podman("port", stack.compose.container("worker-0"), check=False).stdout.strip()
    assert ports == "", ports  # exposed on the compose network, never published on the host


def test_sigterm_to_the_trainer_saves_and_requeues_its_run(stack: Stack) -> None:
    with stack.client() as c:
        ds = c.get("/v1/datasets").json()["data"][0]["id"]
        job = c.post("/v1/train-jobs", json=_train(ds, 100000)).json()
    stack.wait_job(
        job["id"],
        "/v1/train-jobs",
        ("running",),
        300,
        pred=lambda j: len(j["checkpoints"]) >= 1 and j["step"] >= 3,
    )
    trainer = stack.compose.container("trainer")
    stack.compose.podman("kill", "--signal", "TERM", trainer)
    with stack.client() as c:

        def requeued() -> bool:
            events = c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"]
            return any(e["type"] == "status" and e["data"].get("reason") == "worker_shutdown" for e in events)

        ps.wait_for(
            requeued,
            300,
            "train job requeued by the trainer's warm shutdown",
            detail=lambda: stack.compose.logs("trainer"),
        )
        saved = c.get(f"/v1/train-jobs/{job['id']}/checkpoints").json()["data"]
    assert saved, "no checkpoint saved before the requeue"
    # restart: unless-stopped brings the trainer back; the run resumes (second attempt) from its checkpoint
    stack.wait_job(job["id"], "/v1/train-jobs", ("running",), 300, pred=lambda j: j["attempts"] >= 2)
    with stack.client() as c:

        def resumed_steps() -> list[int]:
            events = c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"]
            cut = max(i for i, e in enumerate(events) if e["data"].get("reason") == "worker_shutdown")
            return [e["data"]["step"] for e in events[cut:] if e["type"] == "metrics"]

        resumed = ps.wait_for(resumed_steps, 300, "metrics of the resumed run")
    steps = {k["step"] for k in saved}
    assert resumed[0] > 1 and resumed[0] - 1 in steps, (resumed, steps)  # from a checkpoint, not from step 1
    with stack.client() as c:
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
    assert stack.wait_job(job["id"], "/v1/train-jobs", timeout=120)["status"] == "cancelled"


def test_down_then_up_keeps_every_job_model_and_image(stack: Stack) -> None:
    with stack.client() as c:
        before = {p: c.get(p).json()["data"] for p in ("/v1/images", "/v1/train-jobs", "/v1/models")}
    assert before["/v1/images"] and before["/v1/train-jobs"] and len(before["/v1/models"]) >= 2
    stack.compose("down", "-t", "30", timeout=600)
    assert stack.compose.names() == []
    stack.up()
    with stack.client() as c:
        after = {p: c.get(p).json()["data"] for p in before}
        for p in before:
            assert sorted(x["id"] for x in after[p]) == sorted(x["id"] for x in before[p]), p
        job = c.get(f"/v1/images/{stack.notes['image_job']}").json()
        png = c.get(f"/v1/images/{job['id']}/files/0")
    assert job["status"] == "succeeded" and png.status_code == 200 and png.content[:4] == b"\x89PNG"
