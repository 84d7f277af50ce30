"""The container stack on a machine with podman and no image registry: base image from debootstrap, the project's
image from the real Dockerfile, stand-in PostgreSQL/Redis images from Debian's packages, and docker-compose.yml
plus docker-compose.cpu.yml brought up by podman-compose.

Machine facts this works around, outside the compose files (docs/deployment.md, "Tested without a GPU"):
crun fails on this cgroup layout, so runc; podman's default nofile/nproc ulimits cannot be set without
CAP_SYS_RESOURCE and memlock above 8 MiB is refused, so defaults through a containers.conf of the test's own and
a machine override of the workers' memlock; healthchecks run from systemd timers, and there is no systemd, so the
test runs `podman healthcheck run` itself (HealthTicker), as the timer would."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("HDM_CONTAINER_CACHE", "/var/cache/hdm-containers"))
BASE_IMAGE = "localhost/hdm-debian:bookworm"
APP_IMAGE = "localhost/hdm-serve:cpu-test"
STANDINS = {"postgres": "localhost/hdm-standin-postgres:15", "redis": "localhost/hdm-standin-redis:7"}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# netavark (podman's network backend) runs iptables to set up a build's or container's network.
PACKAGES = ("podman", "runc", "debootstrap", "catatonit", "netavark", "aardvark-dns", "iptables")
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
"""
# memlock: unlimited on a GPU host (pinned memory); this machine refuses more than 8 MiB. A service with ulimits of
# its own loses podman's defaults for the rest, so nofile/nproc are named again here.
MACHINE_OVERRIDE = """x-limits: &limits
  ulimits: {memlock: 8388608, nofile: {soft: 1024, hard: 1024}, nproc: {soft: 1024, hard: 1024}}
services:
  # the test's small images (32 px; the API's default floor is 256): like the service tests' HDM_IMAGE_MIN_SIZE
  api: {environment: {HDM_IMAGE_MIN_SIZE: "32"}}
  worker-0: *limits
  worker-1: *limits
  trainer: *limits
"""


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def install_tools() -> None:
    """podman, runc, debootstrap and iptables from Debian's packages when missing (CI runs as root on a fresh
    machine; one seen here had podman but no iptables, and every `RUN` of a build failed in netavark)."""
    if all(shutil.which(t) for t in ("podman", "runc", "debootstrap", "iptables")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise AssertionError(
            "the container test needs podman, runc, debootstrap and iptables: apt-get install "
            + " ".join(PACKAGES)
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, check=False)
    run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env)


def pip_find_links() -> Path | None:
    """The folder pip's find-links names on this machine (where the CPU torch wheel lies), if any."""
    r = run(["pip", "config", "get", "global.find-links"], check=False) if shutil.which("pip") else None
    value = (r.stdout.strip() if r and r.returncode == 0 else "") or os.environ.get("PIP_FIND_LINKS", "")
    path = Path(value.split()[0]) if value else None
    return path if path is not None and path.is_dir() else None


def image_exists(name: str) -> bool:
    return run([*PODMAN, "image", "exists", name], check=False).returncode == 0


def image_id(name: str) -> str | None:
    r = run([*PODMAN, "image", "inspect", "--format", "{{.Id}}", name], check=False)
    return r.stdout.strip() or None if r.returncode == 0 else None


def build_images(log: Path) -> dict[str, float]:
    """Base (debootstrap, cached), stand-ins and the project's image; seconds per step. Podman's layer cache makes
    a second run cheap; only the project's image is rebuilt from its changed layers."""
    times: dict[str, float] = {}
    t = time.monotonic()
    run(["bash", str(ROOT / "docker/containers/base-image.sh"), BASE_IMAGE], timeout=1200)
    times["base"] = time.monotonic() - t
    common = [*PODMAN, "build", "--format", "docker", *ULIMITS, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    for name, tag in STANDINS.items():
        t = time.monotonic()
        run(
            ["nice", *common, "-t", tag, str(ROOT / "docker/containers" / name)], timeout=900
        )  # cached layers
        times[name] = time.monotonic() - t
    args = [*PODMAN, "build", "--format", "docker", *ULIMITS, "--build-arg", f"CUDA_IMAGE={BASE_IMAGE}"]
    wheels = pip_find_links()
    if wheels is not None:  # the CPU torch wheel, through the Dockerfile's TORCH_FIND_LINKS
        args += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "TORCH_FIND_LINKS=/wheels"]
    if CA_BUNDLE.is_file():  # pip behind this machine's TLS-inspecting proxy
        args += [
            "-v",
            f"{CA_BUNDLE}:/etc/hdm-ca.crt:ro",
            "--build-arg",
            "PIP_CERT=/etc/hdm-ca.crt",
        ]
    previous = image_id(APP_IMAGE)
    t = time.monotonic()
    with log.open("w") as fh:
        r = subprocess.run(
            ["nice", "-n", "10", *args, "-t", APP_IMAGE, str(ROOT)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    if r.returncode != 0:
        raise AssertionError(f"image build failed:\n{log.read_text()[-6000:]}")
    times["app"] = time.monotonic() - t
    if previous is not None and previous != image_id(APP_IMAGE):
        # this test's own previous build, now untagged: every changed checkout would otherwise leave 1.6 GB behind
        run([*PODMAN, "image", "rm", previous], check=False)
    return times


def image_size(name: str) -> int:
    return int(run([*PODMAN, "image", "inspect", name, "--format", "{{.Size}}"]).stdout.strip())


class Compose:
    """podman-compose with this test's project name, env file and override files."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.project = env["COMPOSE_PROJECT_NAME"]
        self.workdir = workdir
        self.env_file = workdir / "test.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        (workdir / "containers.conf").write_text(CONTAINERS_CONF)
        (workdir / "machine.yml").write_text(MACHINE_OVERRIDE)
        files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml", workdir / "machine.yml"]
        beside = Path(sys.executable).parent / "podman-compose"  # the test extra, in the venv running pytest
        self.base = [str(beside) if beside.exists() else shutil.which("podman-compose") or "podman-compose"]
        self.base += ["--env-file", str(self.env_file), "-p", self.project]
        for f in files:
            self.base += ["-f", str(f)]
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("HDM_", "POSTGRES_", "REDIS_"))}
        self.proc_env = {**keep, "CONTAINERS_CONF": str(workdir / "containers.conf")}

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], timeout=timeout, check=check, cwd=ROOT, env=self.proc_env)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*PODMAN, *args], timeout=timeout, check=check, env=self.proc_env)

    def names(self) -> list[str]:
        r = self.podman(
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={self.project}",
            "--format",
            "{{.Names}}",
        )
        return r.stdout.split()

    def state(self, service: str) -> dict[str, str]:
        fmt = "{{.State.Status}}|{{.State.ExitCode}}|{{.State.Health.Status}}"
        r = self.podman("inspect", self.container(service), "--format", fmt, check=False)
        status, code, health = [*r.stdout.strip().split("|"), "", "", ""][:3]
        return {"status": status, "exit_code": code, "health": health}

    def logs(self, service: str, tail: int = 80) -> str:
        r = self.podman("logs", "--tail", str(tail), self.container(service), check=False)
        return r.stdout + r.stderr

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {n}\n{self.podman('logs', '--tail', '40', n, check=False).stderr}" for n in self.names()
        )

    def remove_everything(self) -> None:
        """What this project created: containers, pods, networks and volumes (never the images or the cache)."""
        self("down", "-v", "-t", "10", timeout=300, check=False)
        for name in self.names():
            self.podman("rm", "-f", "-v", name, check=False)
        for kind in ("pod", "network", "volume"):
            r = self.podman(
                kind, "ls", "-q", "--filter", f"label=io.podman.compose.project={self.project}", check=False
            )
            for item in r.stdout.split():
                self.podman(kind, "rm", "-f", item, check=False)


class HealthTicker:
    """Runs each container's healthcheck every ``interval`` seconds, as the systemd timer podman arms would."""

    def __init__(self, compose: Compose, interval: float = 3.0) -> None:
        self.compose, self.interval = compose, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> HealthTicker:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                for name in self.compose.names():
                    self.compose.podman("healthcheck", "run", name, check=False, timeout=30)


def wait_for(pred, timeout: float, what: str, interval: float = 1.0, detail=None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{detail() if detail else ''}")
