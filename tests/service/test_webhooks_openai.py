"""Signed webhooks to a loopback receiver, and the official openai client against /v1/images/generations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from PIL import Image
from service_stack import Stack

SMALL = {"width": 32, "height": 32, "steps": 2}
SECRET = "whsec-test"


class Receiver:
    """Answers 500 to the first call of each job, then 200; records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job = json.loads(body)
                first = not any(c["job"]["id"] == job["id"] for c in rec.calls)
                rec.calls.append(
                    {
                        "body": body,
                        "job": job,
                        "headers": dict(self.headers),
                        "t": time.time(),
                        "answered": 500 if first else 200,
                    }
                )
                self.send_response(500 if first else 200)
                self.end_headers()

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _verify(body: bytes, header: str) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(","))
    mac = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"]) and abs(time.time() - int(parts["t"])) < 60


def test_webhook_signed_once_per_job_and_retried_after_500(live_worker: Stack) -> None:
    rec = Receiver()
    try:
        with live_worker.client() as c:
            ok = c.post("/v1/images", json={"prompt": "hook", "webhook": rec.url, **SMALL}).json()
            cancelled = c.post(
                "/v1/images",
                json={"prompt": "hook2", "webhook": rec.url, "width": 64, "height": 64, "steps": 200},
            ).json()
            live_worker.wait_job(cancelled["id"], ("running",))
            c.post(f"/v1/images/{cancelled['id']}/cancel")
            deadline = time.time() + 30
            while time.time() < deadline and sum(1 for x in rec.calls if x["answered"] == 200) < 2:
                time.sleep(0.1)
            time.sleep(2)  # nothing more may arrive: one successful delivery per job
        for job_id, status in ((ok["id"], "succeeded"), (cancelled["id"], "cancelled")):
            calls = [x for x in rec.calls if x["job"]["id"] == job_id]
            assert [x["answered"] for x in calls] == [500, 200], calls
            assert calls[1]["t"] - calls[0]["t"] >= 0.4  # backoff
            for x in calls:
                assert x["job"]["status"] == status
                assert _verify(x["body"], x["headers"]["X-HDM-Signature"])
                assert not _verify(x["body"] + b" ", x["headers"]["X-HDM-Signature"])
                assert x["headers"]["X-HDM-Event"] == f"job.{status}"
    finally:
        rec.server.shutdown()


def test_openai_client_images_generate(live_worker: Stack) -> None:
    client = openai.OpenAI(
        base_url=live_worker.base_url + "/v1", api_key=live_worker.api_key, timeout=60, max_retries=0
    )
    res = client.images.generate(
        model="tiny",
        prompt="a blue square",
        n=2,
        size="32x32",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 11},
    )
    assert len(res.data) == 2 and res.created > 0
    img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json or "")))
    assert img.size == (32, 32) and "Seed: 11" in img.text["parameters"]
    res = client.images.generate(
        prompt="by url",
        size="32x32",
        response_format="url",  # type: ignore[arg-type]
        extra_body={"steps": 1},
    )
    assert res.data[0].url and "/v1/images/img_" in res.data[0].url
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(prompt="bad", size="10x10")  # type: ignore[arg-type]
    assert err.value.body["param"] == "size"  # type: ignore[index]
