"""Contract behaviour over real HTTP: auth, idempotency, queue limits, pagination, SSE, per-field errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from service_stack import ADMIN_KEY, OTHER_KEY, ROOT, Stack

from hdm_core.config import SAMPLER_NAMES, SCHEDULE_NAMES

SMALL = {"width": 32, "height": 32, "steps": 2}


def _assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys, app.main, app.cli, app.queue, worker.celery_app, worker.tasks; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HDM_DATABASE_URL": "sqlite://"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_auth(stack: Stack) -> None:
    with stack.client(key=None) as c:
        _assert_error(c.get("/v1/images"), 401, code="missing_api_key")
    with stack.client(key="wrong") as c:
        _assert_error(c.get("/v1/images"), 401, code="invalid_api_key")
    with stack.client() as c:
        job = c.post("/v1/images", json={"prompt": "mine", **SMALL}).json()
    with stack.client(key=OTHER_KEY) as c:
        _assert_error(c.get(f"/v1/images/{job['id']}"), 404)
    with stack.client(key=None) as c:
        assert c.get("/healthz").status_code == 200


def test_idempotency_key(stack: Stack) -> None:
    body = {"prompt": "idempotent", "seed": 3, **SMALL}
    with stack.client() as c:
        a = c.post("/v1/images", json=body, headers={"Idempotency-Key": "k-123"})
        b = c.post("/v1/images", json=body, headers={"Idempotency-Key": "k-123"})
        assert a.status_code in (200, 202) and b.status_code in (200, 202)
        assert a.json()["id"] == b.json()["id"]
        ids = [j["id"] for j in c.get("/v1/images", params={"limit": 100}).json()["data"]]
        assert ids.count(a.json()["id"]) == 1
        _assert_error(
            c.post("/v1/images", json={**body, "seed": 4}, headers={"Idempotency-Key": "k-123"}),
            409,
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    with stack.client(key=OTHER_KEY) as c:  # keys are scoped to the API key
        other = c.post("/v1/images", json=body, headers={"Idempotency-Key": "k-123"})
        assert other.status_code == 202 and other.json()["id"] != a.json()["id"]


def test_queue_limit_429_with_retry_after(stack: Stack) -> None:
    for p in list(stack.workers):
        stack.kill_worker(p, signal.SIGTERM)
    created: list[str] = []
    with stack.client(key=OTHER_KEY) as c:
        for j in c.get("/v1/images", params={"status": "queued", "limit": 100}).json()["data"]:
            c.post(f"/v1/images/{j['id']}/cancel")
        for _ in range(40):
            r = c.post("/v1/images", json={"prompt": "fill", **SMALL})
            assert r.status_code == 202
            created.append(r.json()["id"])
        r = c.post("/v1/images", json={"prompt": "one too many", **SMALL})
        _assert_error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) > 0
        with stack.client() as mine:  # the limit is per key
            assert mine.post("/v1/images", json={"prompt": "other key", **SMALL}).status_code == 202
        for job_id in created:
            c.post(f"/v1/images/{job_id}/cancel")
        assert c.post("/v1/images", json={"prompt": "room again", **SMALL}).status_code == 202


def test_cursor_pagination_newest_first(stack: Stack) -> None:
    with stack.client(key=OTHER_KEY) as c:
        ids = [c.post("/v1/images", json={"prompt": f"page {i}", **SMALL}).json()["id"] for i in range(5)]
        page1 = c.get("/v1/images", params={"limit": 2}).json()
        assert page1["has_more"] is True
        assert [j["id"] for j in page1["data"]] == ids[::-1][:2]
        page2 = c.get("/v1/images", params={"limit": 2, "after": page1["data"][-1]["id"]}).json()
        assert [j["id"] for j in page2["data"]] == ids[::-1][2:4]
        for job_id in ids:
            c.post(f"/v1/images/{job_id}/cancel")


def _parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        ev: dict = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            ev[k] = v.strip()
        if "event" in ev:
            events.append({"id": int(ev["id"]), "event": ev["event"], "data": json.loads(ev["data"])})
    return events


def test_sse_events_and_last_event_id_resume(live_worker: Stack) -> None:
    with live_worker.client() as c:
        job = c.post("/v1/images", json={"prompt": "stream", **SMALL, "steps": 3}).json()
        with c.stream(
            "GET", f"/v1/images/{job['id']}/events", headers={"Accept": "text/event-stream"}, timeout=60
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        events = _parse_sse(text)
        kinds = [e["event"] for e in events]
        assert kinds[0] == "status" and kinds[-1] == "done" and "progress" in kinds
        assert events[-1]["data"]["status"] == "succeeded"
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        mid = ids[len(ids) // 2]
        with c.stream(
            "GET",
            f"/v1/images/{job['id']}/events",
            headers={"Accept": "text/event-stream", "Last-Event-ID": str(mid)},
        ) as r:
            resumed = _parse_sse("".join(r.iter_text()))
        assert [e["id"] for e in resumed] == [i for i in ids if i > mid]


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 8001}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "ok", "negative_prompt": "x" * 8001}, "negative_prompt"),
    ({"prompt": "ok", "n": 0}, "n"),
    ({"prompt": "ok", "n": 9}, "n"),
    ({"prompt": "ok", "width": 33, "height": 32}, "width"),
    ({"prompt": "ok", "width": 32, "height": 4096}, "height"),
    ({"prompt": "ok", "width": 16, "height": 32}, "width"),
    ({"prompt": "ok", "steps": 0}, "steps"),
    ({"prompt": "ok", "steps": 201}, "steps"),
    ({"prompt": "ok", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "ok", "guidance_scale": "a lot"}, "guidance_scale"),
    ({"prompt": "ok", "seed": -1}, "seed"),
    ({"prompt": "ok", "seed": 2**63}, "seed"),
    ({"prompt": "ok", "sampler": "ddim"}, "sampler"),
    ({"prompt": "ok", "schedule": "linear"}, "schedule"),
    ({"prompt": "ok", "camera": {"zoom": 0.1}}, "camera.zoom"),
    ({"prompt": "ok", "camera": {"x_shift": 6}}, "camera.x_shift"),
    ({"prompt": "ok", "tread_guidance": {"cond_rate": 0.95}}, "tread_guidance.cond_rate"),
    ({"prompt": "ok", "output_format": "gif"}, "output_format"),
    ({"prompt": "ok", "model": "no-such-model"}, "model"),
    ({"prompt": "ok", "webhook": "not a url"}, "webhook"),
    ({"prompt": "ok", "webhook": "http://evil.example.com/hook"}, "webhook"),
    ({"prompt": "ok", "bogus": 1}, "bogus"),
    ({"prompt": "nul\x00byte"}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_image_input_names_the_field(stack: Stack, body: dict, param: str) -> None:
    full = {**SMALL, **body} if "width" not in body and "height" not in body else body
    if body == {}:
        full = {}
    with stack.client() as c:
        _assert_error(c.post("/v1/images", json=full), 422, param=param)


def test_unknown_sampler_or_schedule_lists_the_choices(stack: Stack) -> None:
    with stack.client() as c:
        for field, choices in (("sampler", SAMPLER_NAMES), ("schedule", SCHEDULE_NAMES)):
            r = c.post("/v1/images", json={"prompt": "ok", **SMALL, field: "nope"})
            _assert_error(r, 422, param=field)
            assert all(repr(name) in r.json()["error"]["message"] for name in choices), r.text
        models = c.get("/v1/models").json()["data"]
        assert models and all(m["schedules"] == list(SCHEDULE_NAMES) for m in models)
        assert all({"dpmpp_2m", "unipc", "euler_a"} <= set(m["samplers"]) for m in models)


def test_malformed_requests(stack: Stack) -> None:
    with stack.client() as c:
        _assert_error(
            c.post("/v1/images", content=b"{not json", headers={"Content-Type": "application/json"}),
            400,
            code="invalid_json",
        )
        _assert_error(
            c.post("/v1/images", content=b"[1,2]", headers={"Content-Type": "application/json"}), 422
        )
        _assert_error(c.get("/v1/images/img_nope"), 404, param="id")
        assert (
            c.post(
                "/v1/images", json={"prompt": "null ok", "webhook": None, "seed": None, **SMALL}
            ).status_code
            == 202
        )
        _assert_error(c.get("/v1/images", params={"limit": 0}), 422, param="limit")
        _assert_error(c.get("/v1/images", params={"limit": 1000}), 422, param="limit")
        _assert_error(c.get("/v1/nowhere"), 404)
        _assert_error(c.delete("/v1/images"), 405)
        _assert_error(
            c.post("/v1/images/generations", json={"prompt": "x", "size": "big"}), 422, param="size"
        )
        _assert_error(
            c.post("/v1/images/generations", json={"prompt": "x", "size": "30x30"}), 422, param="size"
        )
        _assert_error(c.post("/v1/datasets", json={"name": "x", "path": "/etc"}), 403, param="path")
        _assert_error(c.post("/v1/datasets", json={"name": "x", "path": "../.."}), 403, param="path")
        _assert_error(c.post("/v1/datasets", json={"name": "x" * 2_000_000}), 413, code="too_large")
        # routes that take an init image and mask allow bigger bodies (app.main.body_limit); fields keep their limits
        _assert_error(c.post("/v1/images", json={"prompt": "x" * 2_000_000}), 422, param="prompt")
        _assert_error(c.get("/v1/images", params={"after": "img_\x00"}), 400, param="after")


def test_system_endpoints(stack: Stack) -> None:
    with stack.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["migrations"] is True and ready.json()["broker"] is True
        sysinfo = c.get("/v1/system").json()
        assert sysinfo["mode"] == "celery" and [g["index"] for g in sysinfo["gpus"]] == [0]
        assert set(sysinfo["queue_depth"]) == {"image", "train", "dataset"}
        with stack.client(key=ADMIN_KEY) as admin:
            metrics = admin.get("/metrics").text
        assert "hdm_jobs{" in metrics and "hdm_http_requests_total{" in metrics
        models = c.get("/v1/models").json()["data"]
        assert [m["name"] for m in models] == ["tiny"]
        m = models[0]
        assert (
            m["id"].startswith("ckpt_")
            and m["source"] == "file"
            and m["params"] > 0
            and len(m["sha256"]) == 64
        )
        assert c.get(f"/v1/models/{m['id']}").json()["arch"]["in_channels"] == 3
        f = c.get(f"/v1/models/{m['id']}/file")
        assert f.status_code == 200 and len(f.content) == m["size_bytes"]
        spec = c.get("/openapi.json").json()
        for path in (
            "/v1/images",
            "/v1/images/generations",
            "/v1/train-jobs",
            "/v1/models",
            "/v1/datasets",
            "/v1/system",
            "/healthz",
            "/readyz",
            "/metrics",
        ):
            assert path in spec["paths"], path


def test_database_api_keys_create_and_revoke(stack: Stack) -> None:
    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    key_id, key = cli("keys", "create", "ci").split()
    with stack.client(key=key) as c:
        deadline = time.monotonic() + 3  # a new key is seen within a second
        while c.get("/v1/images").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        cli("keys", "revoke", key_id)
        deadline = time.monotonic() + 10  # the API re-reads stored keys every 5 s
        while c.get("/v1/images").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        _assert_error(c.get("/v1/images"), 401, code="invalid_api_key")
