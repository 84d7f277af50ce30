"""docker-compose.cpu.yml, rendered over docker-compose.yml by podman-compose (a Compose that reads `!reset`): no
GPU reservations, two CPU workers and the trainer, everything else as in docker-compose.yml. The container test
(tests/containers/) runs this very combination."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import SECRETS, clean_env

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"]
HDM = ["migrate", "api", "worker-0", "worker-1", "trainer"]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor(
    "!reset", lambda _loader, _node: None
)  # podman-compose echoes the x- field as written


def render(files: list[Path], tmp: Path) -> dict:
    exe = Path(sys.executable).parent / "podman-compose"
    cmd = str(exe) if exe.exists() else shutil.which("podman-compose")
    if cmd is None:
        pytest.fail("podman-compose not found: install the test extras (`pip install -e '.[test]'`)")
    env_file = tmp / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    args = [cmd, "--env-file", str(env_file), *(a for f in files for a in ("-f", str(f))), "config"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    return yaml.load(r.stdout, _Loader)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("cpu")
    return render(FILES[:1], tmp), render(FILES, tmp)


def test_no_gpu_reservations_and_two_cpu_workers(both: tuple[dict, dict]) -> None:
    gpu, cpu = both
    assert any(s.get("deploy") for s in gpu["services"].values())  # the base file does reserve GPUs
    assert set(cpu["services"]) == {"postgres", "redis", *HDM}
    for name in HDM:
        svc = cpu["services"][name]
        assert not svc.get("deploy"), name
        assert svc["environment"]["HDM_DEVICE"] == "cpu" and svc["environment"]["HDM_SLOTS"] == "0,1", name
    trainer = cpu["services"]["trainer"]["environment"]
    assert trainer["HDM_LOCAL_SLOTS"] == "0,1" and trainer["HDM_WORKER_QUEUES"] == "hdm.train.0,hdm.train.1"


def test_same_image_volumes_secrets_and_healthchecks_otherwise(both: tuple[dict, dict]) -> None:
    gpu, cpu = both
    for name, svc in cpu["services"].items():
        base = gpu["services"][name]
        for key in ("image", "volumes", "healthcheck", "command", "depends_on", "restart", "init"):
            assert svc.get(key) == base.get(key), (name, key)
        env = {
            k: v for k, v in (base.get("environment") or {}).items() if k not in ("HDM_DEVICE", "HDM_SLOTS")
        }
        assert env.items() <= (svc.get("environment") or {}).items() or name == "trainer", name
    assert "TORCH_FIND_LINKS" in " ".join(cpu["services"]["api"]["build"]["args"])
