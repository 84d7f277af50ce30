"""Static checks of the container deployment: Dockerfile, .dockerignore, docker-compose.yml, .env.example.

Nothing here needs a Docker engine or a GPU. ``compose config`` validates the file against the Compose schema and
interpolates it; the assertions then read the rendered result, so YAML anchors and merges are checked as Compose
resolves them.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"

REQUIRED = ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "HDM_API_KEYS", "HDM_WEBHOOK_SECRET"]
WORKERS = [f"worker-{i}" for i in range(4)]
TRAINER = "trainer"  # train jobs (multi-GPU): sees all GPUs, consumes the hdm.train.<slot> queues
GPU_SERVICES = [*WORKERS, TRAINER]
SHARED_MOUNTS = ["/data/models", "/data/datasets", "/data/outputs", "/data/runs"]


# ---------------------------------------------------------------------------------------------------------------
# helpers tolerant of both renderers (docker-compose 1.29 and the Compose v2 plugin)


def env_of(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def depends_of(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return dict.fromkeys(dep, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def command_of(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts_of(svc: dict) -> dict[str, str]:
    """container path -> source (host path or volume name)."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = parts[0]
        else:
            out[v["target"]] = v.get("source")
    return out


def to_bytes(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)b?", str(size).strip().lower())
    assert m, f"unreadable size {size!r}"
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def to_seconds(duration) -> float:
    if isinstance(duration, (int, float)):
        return float(duration) / 1e9 if duration > 10**6 else float(duration)  # v2 renders nanoseconds
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, f"unreadable duration {duration!r}"
    for num, unit in parts:
        total += float(num) * units[unit]
    return total


def healthcheck_test(svc: dict) -> str:
    hc = svc.get("healthcheck") or {}
    assert not hc.get("disable"), "healthcheck disabled"
    test = hc.get("test")
    assert test, "no healthcheck test"
    return " ".join(test) if isinstance(test, list) else str(test)


def worker_queues(svc: dict) -> list[str]:
    cmd = command_of(svc)
    for flag in ("-Q", "--queues"):
        if flag in cmd:
            return cmd[cmd.index(flag) + 1].split(",")
    env = env_of(svc)
    assert env.get("HDM_WORKER_QUEUES"), "worker names no queues (-Q/--queues or HDM_WORKER_QUEUES)"
    return env["HDM_WORKER_QUEUES"].split(",")


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_hadolint_passes(hadolint):
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"hadolint findings:\n{r.stdout}{r.stderr}"


def test_hadolint_is_a_real_linter(hadolint, tmp_path):
    """Guard against a no-op hadolint: it must reject an obviously bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER root\n")
    r = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "DL3006" in r.stdout, r.stdout


def test_dockerfile_multistage_on_cuda_base():
    ins = dockerfile_instructions()
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) >= 2, "expected a builder and a runtime stage"
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert base and base.group(1).startswith("nvidia/cuda:"), "base image should be an nvidia/cuda image"
    assert not base.group(1).endswith(":latest") and ":" in base.group(1)


def test_dockerfile_runs_as_non_root_and_sets_runtime_env():
    stage = final_stage()
    users = [rest for w, rest in stage if w == "USER"]
    assert users, "runtime stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    envs = " ".join(rest for w, rest in stage if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs
    assert "HF_HUB_OFFLINE=1" in envs, "the image must never try to download weights"


def test_dockerfile_healthcheck_hits_healthz():
    hcs = [rest for w, rest in final_stage() if w == "HEALTHCHECK"]
    assert len(hcs) == 1 and "/healthz" in hcs[0] and "CMD" in hcs[0]


def test_dockerfile_bakes_in_no_secrets():
    for word, rest in dockerfile_instructions():
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest):
                assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", name, re.I), (
                    f"{word} {name} looks like a secret"
                )
        if word in ("COPY", "ADD"):
            assert not re.search(r"(^|[\s/])\.env(\s|$)", rest), (
                f"{word} {rest}: never copy .env into the image"
            )


def test_dockerfile_pins_torch_and_installs_with_constraints():
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert '"torch==${TORCH_VERSION}"' in text
    installs = [rest for w, rest in dockerfile_instructions() if w == "RUN" and "pip install" in rest]
    assert installs and all("--constraint docker/constraints.txt" in r for r in installs)


def test_constraints_pin_every_dependency_within_its_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraint not pinned with ==: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":  # pinned by the Dockerfile (CUDA wheel)
            continue
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"docker/constraints.txt pins {name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


# ---------------------------------------------------------------------------------------------------------------
# .dockerignore: compute the build context the way Docker does (last matching pattern wins; a pattern that matches
# a folder covers everything below it) and check what gets in.


def _ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        pats.append((neg, re.compile(rx)))
    return pats


def in_build_context(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in _ignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not neg
    return not excluded


def test_dockerignore_matcher_sanity():
    assert not in_build_context(".env")
    assert in_build_context("app/main.py")


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".git/config",
        ".venv/bin/python",
        "tests/fixtures/hdm-reference/xut-tiny.safetensors",
        "storage/models/hdm-xut-340M.safetensors",
        "app/__pycache__/main.cpython-312.pyc",
        "var/hdm.db",
        "docker-compose.yml",
        "app/weights.safetensors",
    ],
)
def test_dockerignore_keeps_out(path):
    assert not in_build_context(path), f"{path} would be sent to the Docker build"


def test_dockerignore_lets_in_what_the_build_needs():
    needed = ["pyproject.toml", "README.md", "docker/constraints.txt", "alembic.ini", "migrations/env.py"]
    for pkg in ("app", "worker", "hdm_core"):
        needed += [
            str(p.relative_to(ROOT)) for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts
        ]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        needed.append(readme)
    missing = [p for p in needed if not in_build_context(p)]
    assert not missing, f"excluded from the build context but needed: {missing}"
    for w, rest in dockerfile_instructions():
        if w == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                if src not in (".", "./"):
                    assert in_build_context(src), f"COPY {src}: excluded by .dockerignore"


# ---------------------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_config_validates(compose, secrets):
    r = compose(secrets, "config", "-q")
    assert r.returncode == 0, f"compose config -q failed:\n{r.stderr}"


@pytest.mark.parametrize("var", REQUIRED)
def test_required_variable_missing_fails(compose, secrets, var):
    env = {k: v for k, v in secrets.items() if k != var}
    r = compose(env, "config", "-q")
    assert r.returncode != 0, f"compose accepted a config without {var}"
    assert f"set {var}" in r.stderr, f"error should tell the user to set {var}:\n{r.stderr}"


@pytest.mark.parametrize("var", REQUIRED)
def test_required_variable_empty_fails(compose, secrets, var):
    r = compose({**secrets, var: ""}, "config", "-q")
    assert r.returncode != 0 and f"set {var}" in r.stderr, r.stderr


def test_required_variables_have_no_defaults():
    text = COMPOSE_FILE.read_text()
    for var in REQUIRED:
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses, f"{var} not used"
        assert all(u.startswith(":?") for u in uses), f"{var} must always be ${{{var}:?...}}: {uses}"


def test_services_present(rendered):
    assert set(rendered["services"]) == {"postgres", "redis", "migrate", "api", *WORKERS, TRAINER}


def test_four_workers_pinned_to_distinct_gpus(rendered):
    ids = []
    for name in WORKERS:
        svc = rendered["services"][name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one GPU per worker"
        dev = devices[0]
        assert dev.get("driver") == "nvidia" and "gpu" in dev.get("capabilities", []), dev
        assert len(dev["device_ids"]) == 1 and "count" not in dev, dev
        ids.append(str(dev["device_ids"][0]))
        assert env_of(svc).get("HDM_DEVICE") == "cuda:0", (
            f"{name}: the one visible GPU is cuda:0 in the container"
        )
    assert sorted(ids) == ["0", "1", "2", "3"]
    assert not rendered["services"]["api"].get("deploy", {}).get("resources", {}).get("reservations")


def test_workers_have_distinct_queues_and_share_images(rendered):
    own, slots = [], []
    for name in WORKERS:
        svc = rendered["services"][name]
        cmd = command_of(svc)
        assert "worker" in cmd, cmd
        assert "--concurrency" in cmd and cmd[cmd.index("--concurrency") + 1] == "1", cmd
        queues = worker_queues(svc)
        assert "hdm.images" in queues, f"{name} must also consume the shared images queue"
        gpu_queues = [q for q in queues if q.startswith("hdm.gpu.")]
        assert len(gpu_queues) == 1, queues
        own += gpu_queues
        slots.append(env_of(svc)["HDM_GPU_INDEX"])
    assert sorted(own) == [f"hdm.gpu.{i}" for i in range(4)]
    assert sorted(slots) == ["0", "1", "2", "3"]
    assert own == [f"hdm.gpu.{s}" for s in slots], "queue must follow the worker's slot"
    api_slots = env_of(rendered["services"]["api"])["HDM_SLOTS"].split(",")
    assert sorted(api_slots) == sorted(slots), "the API must know every worker slot"


def test_trainer_sees_all_gpus_and_consumes_the_train_queues(rendered):
    """Multi-GPU train jobs: the pinned workers see one GPU each, so the trainer service, which sees all of them,
    runs every train job (torchrun gets CUDA_VISIBLE_DEVICES = the leased slots)."""
    svc = rendered["services"][TRAINER]
    cmd = command_of(svc)
    assert "worker" in cmd and "--trainer" in cmd, cmd
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0].get("driver") == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0].get("count") == "all" and "device_ids" not in devices[0], devices
    env = env_of(svc)
    assert "HDM_GPU_INDEX" not in env, "the trainer is not pinned to a slot"
    assert env["HDM_DEVICE"].startswith("cuda")
    slots = [env_of(rendered["services"][w])["HDM_GPU_INDEX"] for w in WORKERS]
    assert env["HDM_LOCAL_SLOTS"].split(",") == slots, "local GPU i is worker-i's slot"
    assert sorted(worker_queues(svc)) == sorted(f"hdm.train.{s}" for s in slots)
    assert to_bytes(svc["shm_size"]) >= 8 * 1024**3 and svc.get("init") is True
    assert to_seconds(svc["stop_grace_period"]) >= 120, "a run checkpoints and re-queues itself on SIGTERM"
    # nobody else takes train jobs: a pinned worker would start torchrun seeing a single GPU
    for name in WORKERS:
        assert not [q for q in worker_queues(rendered["services"][name]) if q.startswith("hdm.train")], name


def test_worker_slots_can_be_moved_for_a_second_machine(compose, secrets):
    env = {**secrets, "HDM_SLOTS": "0,1,2,3,4,5,6,7", **{f"HDM_WORKER{i}_SLOT": str(4 + i) for i in range(4)}}
    r = compose(env, "config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    for i, name in enumerate(WORKERS):
        svc = cfg["services"][name]
        assert worker_queues(svc)[0] == f"hdm.gpu.{4 + i}" or f"hdm.gpu.{4 + i}" in worker_queues(svc)
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(i)]
    trainer = env_of(cfg["services"][TRAINER])
    assert trainer["HDM_LOCAL_SLOTS"] == "4,5,6,7"
    assert trainer["HDM_NODE_ADDR"] == "" and trainer["HDM_RDZV_PORT"] == "29400"  # set per machine in .env
    moved = yaml.safe_load(compose({**env, "HDM_NODE_ADDR": "10.0.0.11"}, "config").stdout)
    assert env_of(moved["services"][TRAINER])["HDM_NODE_ADDR"] == "10.0.0.11"
    assert worker_queues(cfg["services"][TRAINER]) == [f"hdm.train.{4 + i}" for i in range(4)]


def test_healthchecks(rendered):
    s = rendered["services"]
    assert "pg_isready" in healthcheck_test(s["postgres"])
    assert "redis-cli" in healthcheck_test(s["redis"]) and "ping" in healthcheck_test(s["redis"])
    assert "/healthz" in healthcheck_test(s["api"])


def test_migrate_is_a_one_shot_dependency(rendered):
    s = rendered["services"]
    mig = s["migrate"]
    assert "migrate" in command_of(mig)
    assert str(mig.get("restart", "no")) in ("no", "False", "false"), "migrate must run once, not restart"
    assert depends_of(mig).get("postgres") == "service_healthy"
    for name in ["api", *GPU_SERVICES]:
        deps = depends_of(s[name])
        assert deps.get("migrate") == "service_completed_successfully", f"{name}: {deps}"
        assert deps.get("postgres") == "service_healthy" and deps.get("redis") == "service_healthy", name


def test_restart_policies_and_grace(rendered):
    s = rendered["services"]
    for name in ["postgres", "redis", "api", *GPU_SERVICES]:
        assert s[name].get("restart") in ("unless-stopped", "always"), name
    for name in GPU_SERVICES:
        assert to_seconds(s[name]["stop_grace_period"]) >= 120, "workers need time to checkpoint on SIGTERM"
        assert s[name].get("init") is True


def test_worker_shm_size(rendered):
    for name in GPU_SERVICES:
        assert to_bytes(rendered["services"][name]["shm_size"]) >= 8 * 1024**3, name


def test_shared_storage_is_the_same_for_api_and_workers(rendered):
    s = rendered["services"]
    ref = mounts_of(s["api"])
    for target in SHARED_MOUNTS:
        assert target in ref, f"api lacks {target}"
    for name in GPU_SERVICES:
        m = mounts_of(s[name])
        for target in SHARED_MOUNTS:
            assert m.get(target) == ref[target], (
                f"{name} mounts {target} from {m.get(target)}, api from {ref[target]}"
            )
    assert len({ref[t] for t in SHARED_MOUNTS}) == len(SHARED_MOUNTS)


def test_state_volumes_and_broker_durability(rendered):
    s = rendered["services"]
    assert mounts_of(s["postgres"]).get("/var/lib/postgresql/data") in rendered.get("volumes", {})
    assert mounts_of(s["redis"]).get("/data") in rendered.get("volumes", {})
    redis_cmd = " ".join(command_of(s["redis"]))
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd and "--requirepass" in redis_cmd


def test_secrets_reach_the_right_places(rendered, secrets):
    s = rendered["services"]
    for name in ["api", "migrate", *WORKERS]:
        env = env_of(s[name])
        assert f":{secrets['POSTGRES_PASSWORD']}@postgres:5432/" in env["HDM_DATABASE_URL"], name
        assert env["HDM_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["HDM_BROKER_URL"] == f"redis://:{secrets['REDIS_PASSWORD']}@redis:6379/0", name
        assert env["HDM_WEBHOOK_SECRET"] == secrets["HDM_WEBHOOK_SECRET"]
    api = env_of(s["api"])
    assert api["HDM_API_KEYS"] == secrets["HDM_API_KEYS"] and api["HDM_REQUIRE_API_KEYS"] == "true"
    for name in WORKERS:
        assert "HDM_API_KEYS" not in env_of(s[name]), "workers do not need the API keys"
    # only the API is published to the world; the backends bind to loopback unless told otherwise
    ports = {n: [str(p) for p in svc.get("ports", [])] for n, svc in s.items()}
    for name in ("postgres", "redis"):
        assert ports[name] and all(p.startswith("127.0.0.1:") or "'127.0.0.1'" in p for p in ports[name]), (
            ports
        )
    for name in ["migrate", *GPU_SERVICES]:
        assert not ports[name], f"{name} should publish no port"


def test_encoders_are_outside_the_scanned_models_dir(rendered):
    """Every *.safetensors under HDM_MODELS_DIR is registered as a model: the text encoder must live elsewhere."""
    for name in ["api", *GPU_SERVICES]:
        env = env_of(rendered["services"][name])
        models_dir, te = env["HDM_MODELS_DIR"].rstrip("/"), env["HDM_TEXT_ENCODER"].rstrip("/")
        assert not (te + "/").startswith(models_dir + "/"), f"{name}: {te} is inside {models_dir}"
        assert any(models_dir.startswith(t + "/") or models_dir == t for t in SHARED_MOUNTS)


def test_compose_uses_anchors_for_workers(raw_compose):
    assert "x-worker" in raw_compose, "workers should share an x-worker extension field"
    text = COMPOSE_FILE.read_text()
    assert text.count("<<: *worker") == 5  # four pinned workers + the trainer


# ---------------------------------------------------------------------------------------------------------------
# .env.example


def env_example(*, commented: bool = True) -> dict[str, str]:
    """NAME=value lines; with ``commented``, also the optional ones shown as ``#NAME=example``."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"(#?)\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m and (commented or not m.group(1)):
            out[m.group(2)] = m.group(3).strip()
    return out


def test_env_example_documents_every_variable(raw_compose):
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    # pass-through settings: `NAME:` with no value takes NAME from .env when set there
    for svc in [raw_compose, *raw_compose["services"].values()]:
        for block in svc.values() if svc is raw_compose else [svc.get("environment")]:
            if isinstance(block, dict):
                used |= {k for k, v in block.items() if v is None and k.isupper()}
    documented = env_example()
    missing = sorted(used - set(documented))
    assert not missing, f".env.example lacks {missing}"
    stale = sorted(set(documented) - used)
    assert not stale, f".env.example lists variables docker-compose.yml never reads: {stale}"


def test_env_example_ships_no_secret_values():
    ex = env_example()
    for var in REQUIRED:
        assert ex.get(var) == "", f"{var} must be blank in .env.example"


def test_env_example_defaults_render(compose, secrets):
    """A .env made from the example (secrets filled in) is valid and renders like the built-in defaults."""
    ex = {k: v for k, v in env_example(commented=False).items() if v != ""}
    r = compose({**ex, **secrets}, "config")
    assert r.returncode == 0, r.stderr
    r0 = compose(secrets, "config")
    assert r0.returncode == 0, r0.stderr
    assert yaml.safe_load(r.stdout) == yaml.safe_load(r0.stdout), (
        ".env.example values differ from compose defaults"
    )
