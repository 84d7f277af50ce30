"""Webhook targets and delivery (issue 10 items 13 and 15): no loopback/private targets unless allow-listed by
scheme://host:port, the address is checked when sending, the default secret is refused, and a slow receiver does
not hold up the maintenance tick."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from service_stack import SLOW_WEBHOOK_PORT, WEBHOOK_BASE, WEBHOOK_PORT, Stack
from test_api_contract import SMALL, _assert_error

from app.errors import Invalid
from app.settings import get_settings

PRIVATE = [
    "http://127.0.0.1:8080/x",
    "http://localhost/x",
    "http://10.1.2.3/x",
    "http://192.168.0.5:9000/x",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/x",
    "http://0.0.0.0/x",
    "http://[::ffff:127.0.0.1]/x",
    "https://app.localhost/x",
]


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("HDM_WEBHOOK_ALLOW_HOSTS", "HDM_WEBHOOK_ALLOW_PUBLIC"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.mark.parametrize("url", PRIVATE)
def test_default_settings_refuse_loopback_and_private_targets(
    settings_env: pytest.MonkeyPatch, url: str
) -> None:
    from app.services import webhooks

    with pytest.raises(Invalid) as err:
        webhooks.check_url(url)
    assert err.value.param == "webhook"
    settings_env.setenv("HDM_WEBHOOK_ALLOW_PUBLIC", "true")  # public targets allowed: private ones still not
    get_settings.cache_clear()
    with pytest.raises(Invalid):
        webhooks.check_url(url)


def test_allow_list_is_scheme_host_and_port(settings_env: pytest.MonkeyPatch) -> None:
    from app.services import webhooks

    settings_env.setenv("HDM_WEBHOOK_ALLOW_HOSTS", "http://127.0.0.1:8123")
    get_settings.cache_clear()
    webhooks.check_url("http://127.0.0.1:8123/any/path")
    for url in (
        "http://127.0.0.1:8124/x",
        "https://127.0.0.1:8123/x",
        "http://127.0.0.1/x",
        "http://localhost:8123/",
    ):
        with pytest.raises(Invalid):
            webhooks.check_url(url)
    assert webhooks.pinned_address("http://127.0.0.1:8123/x") is None  # allow-listed: connect as named


def test_names_are_resolved_and_checked_when_sending(settings_env: pytest.MonkeyPatch) -> None:
    """Public mode accepts a name at submission; what it resolves to when sending decides (DNS rebinding)."""
    from app.services import webhooks

    settings_env.setenv("HDM_WEBHOOK_ALLOW_PUBLIC", "true")
    get_settings.cache_clear()
    webhooks.check_url("https://hooks.example.com/hdm")
    webhooks.check_url("http://8.8.8.8/hook")
    name = socket.gethostname()  # this machine's name: resolves to a loopback/private address
    webhooks.check_url(f"http://{name}:9/x")  # a name: accepted now, checked when sending
    with pytest.raises(webhooks.WebhookRefused, match="non-public"):
        webhooks.pinned_address(f"http://{name}:9/x")
    with pytest.raises(webhooks.WebhookRefused, match="non-public"):
        webhooks.pinned_address("http://localhost:9/x")


def test_default_webhook_secret_refused_when_keys_are_required(stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in stack.env.items() if k.startswith("HDM_") and k != "HDM_WEBHOOK_SECRET"}
    api = Stack(env, tmp_path, stack.api_key)
    try:
        with pytest.raises(RuntimeError, match="API exited"):
            api.start_api()
        assert "HDM_WEBHOOK_SECRET" in "".join(p.read_text() for p in tmp_path.glob("*api.log"))
    finally:
        api.stop()


class HoldingReceiver:
    """Holds every call until released (or 20 s): a slow webhook receiver."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                rec.calls += 1
                rec.release.wait(20)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_a: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", SLOW_WEBHOOK_PORT), Handler)
        self.url = f"http://127.0.0.1:{SLOW_WEBHOOK_PORT}/slow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_slow_webhook_receiver_does_not_hold_up_scheduling(stack: Stack) -> None:
    for p in list(stack.workers):  # nothing consumes: jobs stay where maintenance puts them
        stack.kill_worker(p, signal.SIGTERM)
    folder = Path(stack.env["HDM_DATA_ROOT"]) / "hook-set"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    rec = HoldingReceiver()
    train_id = None
    try:
        with stack.client() as c:
            ds = c.post("/v1/datasets", json={"name": "hooks", "path": "hook-set"}).json()
            for _ in range(3):  # three deliveries, each held up to the webhook timeout (10 s)
                job = c.post("/v1/images", json={"prompt": "hook", "webhook": rec.url, **SMALL}).json()
                c.post(f"/v1/images/{job['id']}/cancel")
            deadline = time.monotonic() + 10
            while rec.calls == 0:
                assert time.monotonic() < deadline, "no webhook delivery started"
                time.sleep(0.05)
            train = c.post(
                "/v1/train-jobs",
                json={
                    "arch": "xut-pixel-debug",
                    "dataset": ds["id"],
                    "precision": "fp32",
                    "stages": [{"resolution": 16, "steps": 2, "batch_size": 2}],
                },
            )
            assert train.status_code == 202, train.text
            train_id = train.json()["id"]
            # the scheduler (maintenance tick, every 0.5 s) places it while the receiver still holds a delivery
            job = stack.wait_job(
                train_id, ("queued",), timeout=8, path="/v1/train-jobs", pred=lambda j: j["gpus"] == [0]
            )
            assert rec.calls >= 1 and not rec.release.is_set()
            assert job["gpus"] == [0]
    finally:
        if train_id:
            with stack.client() as c:
                c.post(f"/v1/train-jobs/{train_id}/cancel")
        rec.close()


def test_webhook_rejected_port_on_the_real_stack(stack: Stack) -> None:
    with stack.client() as c:
        ok = c.post("/v1/images", json={"prompt": "x", "webhook": f"{WEBHOOK_BASE}/h", **SMALL})
        assert ok.status_code == 202, ok.text
        c.post(f"/v1/images/{ok.json()['id']}/cancel")
        port = next(p for p in range(WEBHOOK_PORT + 1, WEBHOOK_PORT + 3) if p != SLOW_WEBHOOK_PORT)
        other_port = f"http://127.0.0.1:{port}/h"  # same host, a port nobody allow-listed
        _assert_error(
            c.post("/v1/images", json={"prompt": "x", "webhook": other_port, **SMALL}),
            422,
            param="webhook",
            code="webhook_host_not_allowed",
        )
