"""Real processes for the service tests: uvicorn API, Celery workers, helpers to wait on jobs."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.procutil import PARENT_PID_ENV, die_with_parent

ROOT = Path(__file__).resolve().parents[2]
FINAL = ("succeeded", "failed", "cancelled")
API_KEY = "test-key-" + secrets.token_hex(8)
OTHER_KEY = "other-key-" + secrets.token_hex(8)
ADMIN_KEY = "admin-key-" + secrets.token_hex(8)


@contextlib.contextmanager
def own_database(admin: Any) -> Iterator[str]:
    """A PostgreSQL database of its own (its URL), dropped with its connections afterwards."""
    name = f"hdm_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def drop_queues(redis_url: str, prefix: str) -> None:
    """Delete every Redis key of a queue prefix (what a stack's broker left behind)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"{prefix}*"):
        r.delete(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, env: dict[str, str], workdir: Path, api_key: str | None) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.workdir = workdir
        self.api_key = api_key
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.base_url = ""
        self._n = 0

    # -- processes ---------------------------------------------------------------------------------------------
    def _log(self, name: str) -> Any:
        self._n += 1
        return (self.workdir / f"{self._n:02d}-{name}.log").open("wb")

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env=self.env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start_api(
        self,
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        preexec: Callable[[], None] | None = None,
    ) -> str:
        """``host`` and ``preexec`` (e.g. entering a network namespace): an API on another test host."""
        port = free_port()
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env={**self.env, **(extra_env or {})},
            cwd=ROOT,
            stdout=self._log("api"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec or die_with_parent(signal.SIGKILL),
        )
        self.base_url = f"http://{host}:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self.base_url
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None:
                raise RuntimeError("API exited; see logs in " + str(self.workdir))
            time.sleep(0.2)
        raise RuntimeError("API did not start")

    def start_worker(
        self,
        slot: int = 0,
        embedded: bool = False,
        extra_env: dict[str, str] | None = None,
        trainer: bool = False,
        queues: str | None = None,
        preexec: Callable[[], None] | None = None,
        name: str = "",
    ) -> subprocess.Popen[bytes]:
        """A pinned worker for ``slot`` with `hdm worker`'s default queues (its slot, images, train jobs whose first
        slot it is) or ``queues``, or with ``trainer`` the trainer service (`hdm worker --trainer`: the train queues
        of its machine's slots). ``preexec`` replaces die_with_parent (e.g. to enter a network namespace too)."""
        env = {**self.env, "HDM_GPU_INDEX": str(slot), **(extra_env or {})}
        if trainer:
            env.pop("HDM_GPU_INDEX")
            cmd = [
                sys.executable,
                "-m",
                "app.cli",
                "worker",
                "--trainer",
                "--name",
                f"{name}trainer-{self._n}@%h",
            ]
        elif embedded:
            cmd = [sys.executable, "-m", "worker.embedded"]
            env[PARENT_PID_ENV] = str(os.getpid())  # exits on its own if pytest dies
        else:
            prefix = env.get("HDM_QUEUE_PREFIX", "hdm")
            cmd = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--concurrency",
                "1",
                "--prefetch-multiplier",
                "1",
                "-Q",
                queues or f"{prefix}.gpu.{slot},{prefix}.images,{prefix}.train.{slot}",
                "--loglevel",
                "INFO",
                "-n",
                f"{name}slot{slot}-{self._n}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        # own process group (killed as a group, trainer included); SIGTERM (warm shutdown) if pytest dies
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=self._log(f"{name}{'trainer' if trainer else f'worker{slot}'}"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec or die_with_parent(signal.SIGTERM),
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the group leader left behind (trainer processes)
        if proc in self.workers:
            self.workers.remove(proc)

    def stop(self) -> None:
        for proc in list(self.workers):
            self.kill_worker(proc, signal.SIGTERM if proc.poll() is None else signal.SIGKILL)
        if self.api is not None:
            stop_group(self.api)

    # -- HTTP --------------------------------------------------------------------------------------------------
    def client(self, key: str | None = "default", timeout: float = 90) -> httpx.Client:
        """An HTTP client of the stack; its timeout outlasts the longest ``Prefer: wait`` the tests ask the server to
        hold a request (60 s), so a slow machine shows the job's own status, not a client ReadTimeout."""
        k = self.api_key if key == "default" else key
        headers = {"Authorization": f"Bearer {k}"} if k else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def wait_job(
        self,
        job_id: str,
        statuses: tuple[str, ...] = FINAL,
        timeout: float = 60,
        path: str = "/v1/images",
        pred: Any = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"{path}/{job_id}").json()
                if job.get("status") in statuses and (pred is None or pred(job)):
                    return job
                time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s: {job}")

    def logs(self) -> str:
        out = []
        for p in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)


def _reserved_port() -> int:
    """A loopback port for test webhook receivers, fixed for the session so the stack can allow-list it."""
    return free_port()


WEBHOOK_PORT = _reserved_port()
WEBHOOK_BASE = f"http://127.0.0.1:{WEBHOOK_PORT}"
SLOW_WEBHOOK_PORT = _reserved_port()  # a second receiver's: its late retries never reach the first one


def stack_env(tmp: Path, assets: dict[str, Path], db_url: str, broker: str, prefix: str) -> dict[str, str]:
    (tmp / "data").mkdir(exist_ok=True)
    return {
        "HDM_DATABASE_URL": db_url,
        "HDM_BROKER_URL": broker,
        "HDM_QUEUE_PREFIX": prefix,
        "HDM_DATA_ROOT": str(tmp / "data"),
        "HDM_MODELS_DIR": str(assets["models"]),
        "HDM_OUTPUTS_DIR": str(tmp / "outputs"),
        "HDM_RUNS_DIR": str(tmp / "runs"),
        "HDM_TEXT_ENCODER": str(assets["te"]),
        "HDM_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        "HDM_ADMIN_KEYS": ADMIN_KEY,
        "HDM_IMAGE_MIN_SIZE": "32",
        "HDM_HEARTBEAT_S": "0.5",
        "HDM_STALE_AFTER_S": "4",
        "HDM_MAINTENANCE_INTERVAL_S": "0.5",
        "HDM_REENQUEUE_GRACE_S": "1",
        "HDM_WEBHOOK_BACKOFF_S": "0.5",
        "HDM_QUEUE_LIMIT": "40",
        "HDM_SLOTS": "0",
        "HDM_FORCE_CANCEL_AFTER_S": "20",
        "HDM_WEBHOOK_SECRET": "whsec-test",
        "HDM_WEBHOOK_ALLOW_HOSTS": f"{WEBHOOK_BASE},http://127.0.0.1:{SLOW_WEBHOOK_PORT}",
    }


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process, then SIGKILL its whole process group (started with start_new_session=True), so no
    child (an embedded worker, a trainer) outlives the test even when the leader ignored or outlived SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def process_alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out


class TcpProxy:
    """A loopback TCP forwarder: a database outage under a running API is ``stop()`` (listener and every
    connection closed, new connections refused)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.stopped.is_set():
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(
            OSError
        ):  # close() alone does not wake a thread blocked in accept() on Linux
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
