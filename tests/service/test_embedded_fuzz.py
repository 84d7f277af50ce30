"""Embedded mode (`hdm serve`: SQLite, no Redis/PostgreSQL) end to end, and a bounded schemathesis fuzz of
/openapi.json that must never see a 5xx."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_stack import ROOT, Stack, children, free_port, process_alive, stop_group


def _serve(
    tmp: Path, assets: dict[str, Path], extra: dict[str, str], args: list[str]
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {
        "HDM_DATABASE_URL": f"sqlite:///{tmp / 'hdm.db'}",
        "HDM_DATA_ROOT": str(tmp / "data"),
        "HDM_MODELS_DIR": str(assets["models"]),
        "HDM_OUTPUTS_DIR": str(tmp / "out"),
        "HDM_RUNS_DIR": str(tmp / "runs"),
        "HDM_TEXT_ENCODER": str(assets["te"]),
        "HDM_IMAGE_MIN_SIZE": "32",
        "HDM_MAINTENANCE_INTERVAL_S": "0.5",
        **extra,
    }
    s = Stack(env, tmp, None)
    s.env.pop("HDM_BROKER_URL", None)
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env=s.env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_group(proc)  # do not leave a half-started server and its worker behind
    raise AssertionError("hdm serve did not become ready: " + log.read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc, timeout=30)  # SIGTERM, then SIGKILL to the group: the embedded worker never outlives it


def _worker_of(proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        kids = children(proc.pid)
        if kids:
            return kids[0]
        time.sleep(0.1)
    raise AssertionError("hdm serve started no worker")


def _wait_gone(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while process_alive(pid):
        assert time.monotonic() - t0 < timeout, f"worker {pid} still running after {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_embedded_worker_dies_with_sigkilled_serve(tmp_path: Path, assets: dict[str, Path]) -> None:
    """`hdm serve` SIGKILLed (or its harness died): its worker must not be orphaned polling the DB forever."""
    proc, _, log = _serve(tmp_path, assets, {}, [])
    try:
        worker = _worker_of(proc)
        deadline = time.monotonic() + 30
        while "polling the database" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(
            signal.SIGKILL
        )  # the leader only; the worker is in the same group but gets no signal
        proc.wait(timeout=10)
        _wait_gone(worker, 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_idle_embedded_worker_stops_on_sigterm_and_when_orphaned(tmp_path: Path) -> None:
    """Standalone `python -m worker.embedded` on a migrated SQLite file (no server start needed)."""
    s = Stack(
        {
            "HDM_DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}",
            "HDM_BROKER_URL": "db://",
            "HDM_MAINTENANCE_INTERVAL_S": "0.5",
            "HDM_MODELS_DIR": str(tmp_path / "models"),
        },
        tmp_path,
        None,
    )
    s.migrate()

    def start(extra: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / name
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.embedded"],
            env={**s.env, **extra},
            cwd=ROOT,
            stdout=out.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, out

    idle, out = start({}, "idle.log")
    try:
        deadline = time.monotonic() + 30
        while "polling the database" not in out.read_text():
            assert time.monotonic() < deadline and idle.poll() is None, out.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # maintenance ticks run every 0.5 s: the signal may land in one
        t0 = time.monotonic()
        idle.send_signal(signal.SIGTERM)
        assert idle.wait(timeout=5) == 0, out.read_text()
        assert time.monotonic() - t0 < 1.0
    finally:
        stop_group(idle, timeout=1)
    # the portable fallback without PR_SET_PDEATHSIG: HDM_PARENT_PID no longer our parent -> exit
    orphan, out = start({"HDM_PARENT_PID": "1" if os.getpid() != 1 else "2"}, "orphan.log")
    try:
        assert orphan.wait(timeout=30) == 0, out.read_text()
        assert "parent process gone" in out.read_text()
    finally:
        stop_group(orphan, timeout=1)


def test_hdm_serve_embedded_end_to_end(tmp_path: Path, assets: dict[str, Path]) -> None:
    proc, base, log = _serve(tmp_path, assets, {}, [])
    try:
        with httpx.Client(base_url=base, timeout=60) as c:  # open mode: no key configured
            info = c.get("/v1/system").json()
            assert info["mode"] == "embedded"
            r = c.post(
                "/v1/images",
                json={"prompt": "embedded", "width": 32, "height": 32, "steps": 2},
                headers={"Prefer": "wait=45"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "succeeded"
            assert c.get(r.json()["images"][0]["url"]).status_code == 200
            slow = c.post(
                "/v1/images", json={"prompt": "slow", "width": 64, "height": 64, "steps": 200}
            ).json()
            deadline = time.monotonic() + 30
            while c.get(f"/v1/images/{slow['id']}").json()["progress"]["step"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            c.post(f"/v1/images/{slow['id']}/cancel")
            r = c.get(f"/v1/images/{slow['id']}", headers={"Prefer": "wait=10"})
            assert r.json()["status"] == "cancelled"
        assert "API is OPEN" in log.read_text()
        assert (
            "HDM_WEBHOOK_SECRET is the default" in log.read_text()
        )  # open local server: a warning, not a stop
        assert (tmp_path / "hdm.db").is_file()
    finally:
        _stop(proc)


def _fuzz(base: str, key: str, cwd: Path, max_examples: int = 40) -> int:
    """Runs schemathesis (every phase: examples, coverage, fuzzing, stateful) with the not-a-5xx check; returns
    how many test cases it generated."""
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        pytest.skip("schemathesis not installed")
    cmd = [
        exe,
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--workers",
        "1",
        "-H",
        f"Authorization: Bearer {key}",
        "--exclude-path",
        "/v1/images/generations",  # both wait for the images (OpenAI's shape); their inputs have their own tests
        "--exclude-path",
        "/v1/images/edits",
        "--request-timeout",
        "20",
        "--generation-deterministic",
        "--suppress-health-check",
        "all",
    ]
    for _ in range(2):
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
        (cwd / "schemathesis.out").write_text(out.stdout + out.stderr)
        # a crash inside schemathesis itself (not a finding about the API) gets one more run
        if out.returncode == 0 or "ST101" in out.stdout or "Runtime Error" not in out.stdout:
            break
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "Server error" not in out.stdout
    generated = re.search(r"Test cases:\s*(\d+) generated", out.stdout)
    assert generated, out.stdout[-3000:]
    return int(generated.group(1))


def test_schemathesis_fuzz_sqlite_embedded(tmp_path: Path, assets: dict[str, Path]) -> None:
    """No worker runs: generated jobs stay queued (a 2048 px, 200-step job would take hours on CPU)."""
    key = "fuzz-key"
    (tmp_path / "data" / "set").mkdir(parents=True)
    proc, base, _ = _serve(
        tmp_path,
        assets,
        {
            "HDM_API_KEYS": key,
            "HDM_MAX_WAIT_S": "1",
            "HDM_QUEUE_LIMIT": "1000",
            "HDM_WEBHOOK_SECRET": "whsec-fuzz",
        },
        ["--no-worker"],
    )
    try:
        _fuzz(base, key, tmp_path)
    finally:
        _stop(proc)


def test_schemathesis_fuzz_postgres_redis(
    tmp_path: Path, assets: dict[str, Path], fresh_pg_url: str, redis_url: str
) -> None:
    from service_stack import stack_env

    env = stack_env(tmp_path, assets, fresh_pg_url, redis_url, f"fuzz{tmp_path.name[-6:]}")
    env.update({"HDM_MAX_WAIT_S": "1", "HDM_QUEUE_LIMIT": "1000"})
    s = Stack(env, tmp_path, "fuzz-key")
    s.env["HDM_API_KEYS"] = "fuzz-key"
    s.migrate()
    s.start_api()
    try:
        spec = httpx.get(f"{s.base_url}/openapi.json").json()
        headers = {
            p["name"]
            for ops in spec["paths"].values()
            for op in ops.values()
            for p in op.get("parameters", [])
            if p["in"] == "header"
        }
        assert {"Last-Event-ID", "Idempotency-Key", "Prefer"} <= headers, headers  # generated like any field
        assert _fuzz(s.base_url, "fuzz-key", tmp_path, max_examples=100) >= 2000
    finally:
        s.stop()
