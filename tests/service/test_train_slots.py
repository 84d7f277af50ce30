"""Train jobs on two CPU slots through the real stack (uvicorn API + PostgreSQL + Redis + two Celery workers, one per
slot): a 2-process DDP run via torchrun (metrics over SSE, checkpoint -> model -> /v1/images), cancel kills every
process of the trainer's process group and frees both leases, and while a 1-slot run holds slot 0 image jobs run
on slot 1 only."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from service_stack import API_KEY, Stack, own_database, stack_env

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


# -- a stack with two CPU slots (overrides the session's one-slot `stack` for this module) ----------------------
@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path], pg_admin: Any, redis_url: str
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("slots2")
    with own_database(pg_admin) as url:
        env = stack_env(tmp, assets, url, redis_url, f"hdms{secrets.token_hex(4)}")
        env.update({"HDM_SLOTS": "0,1", "HDM_CPU_THREADS": "1", "HDM_TRAIN_KILL_GRACE_S": "10"})
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            s.start_worker(0)
            s.start_worker(1)
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def dataset(stack: Stack) -> str:
    root = Path(stack.env["HDM_DATA_ROOT"]) / "squares2"
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(16):
        Image.new("RGB", (32, 32), COLORS[names[i % 4]]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {names[i % 4]} square")
    with stack.client() as c:
        r = c.post("/v1/datasets", json={"name": "squares2", "path": "squares2"})
        assert r.status_code == 202, r.text
        ds = r.json()
        deadline = time.monotonic() + 120
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    return str(ds["id"])


@pytest.fixture
def two_workers(stack: Stack) -> Iterator[Stack]:
    """Both slots idle and served before each test; a train job a failed test left running is cancelled after."""
    with stack.client() as c:
        deadline = time.monotonic() + 90
        while True:
            sys_ = c.get("/v1/system").json()
            if not any(g["job"] for g in sys_["gpus"]):
                break
            assert time.monotonic() < deadline, sys_
            time.sleep(0.3)
    assert [g["index"] for g in sys_["gpus"]] == [0, 1], sys_
    assert sum(p.poll() is None for p in stack.workers) == 2, stack.logs()
    yield stack
    with stack.client() as c:
        for job in c.get("/v1/train-jobs", params={"limit": 50}).json().get("data", []):
            if job["status"] in ("queued", "running"):
                c.post(f"/v1/train-jobs/{job['id']}/cancel")


def _train_body(dataset: str, steps: int, gpus: int, **kw: object) -> dict[str, Any]:
    return {
        "name": "squares",
        "arch": "xut-pixel-debug",
        "dataset": dataset,
        "precision": "fp32",
        "seed": 1,
        "checkpoint_every": 3,
        "keep_last_n": 2,
        "gpus": gpus,
        "stages": [{"resolution": 16, "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}],
        **kw,
    }


# -- /proc helpers ---------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        st = _stat(pid)
        if st is None:
            return False
        pid = st[1]
        if pid == ancestor:
            return True
        seen += 1
    return False


def _trainer_procs(worker_pid: int) -> dict[int, str]:
    """Live processes below `worker_pid` whose command line runs hdm_core.train (torchrun and its ranks)."""
    out = {}
    for pid in _all_pids():
        cmd = _cmdline(pid)
        st = _stat(pid)
        if "hdm_core.train" in cmd and st is not None and st[0] != "Z" and _descends_from(pid, worker_pid):
            out[pid] = cmd
    return out


def _ranks(procs: dict[int, str]) -> dict[int, dict[str, str]]:
    """The rank processes (not the torchrun launcher) with their RANK/WORLD_SIZE."""
    out = {}
    for pid, cmd in procs.items():
        if "torch.distributed.run" in cmd or "torchrun" in cmd:
            continue
        env = _environ(pid)
        out[pid] = {"RANK": env.get("RANK", "?"), "WORLD_SIZE": env.get("WORLD_SIZE", "?")}
    return out


def _tree(root: int) -> dict[int, str]:
    """`root`, its live descendants, and every live member of their process groups. torchrun (torch >= 2) starts
    each rank in a session of its own, so the trainer is several process groups: the launcher's and one per rank."""
    live = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z":
            live[pid] = st
    members = {pid for pid in live if pid == root or _descends_from(pid, root)}
    groups = {live[pid][2] for pid in members}
    members |= {pid for pid, st in live.items() if st[2] in groups}
    return {pid: _cmdline(pid) for pid in sorted(members)}


def _wait_ranks(s: Stack, job_id: str, n: int, timeout: float = 150) -> tuple[dict[int, str], dict[int, Any]]:
    """Poll /proc until `n` trainer ranks run under one of the stack's workers (or the job is final)."""
    deadline = time.monotonic() + timeout
    procs: dict[int, str] = {}
    ranks: dict[int, Any] = {}
    with s.client() as c:
        while time.monotonic() < deadline:
            procs = {}
            for w in s.workers:
                if w.poll() is None:
                    procs.update(_trainer_procs(w.pid))
            ranks = _ranks(procs)
            if len(ranks) >= n and all(r["RANK"] != "?" for r in ranks.values()):
                return procs, ranks
            job = c.get(f"/v1/train-jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), (job, s.logs())
            time.sleep(0.1)
    raise AssertionError(f"{n} ranks of {job_id} never ran: {procs} {ranks}\n{s.logs()}")


def _worker_of(c: Any, path: str, job_id: str) -> str:
    """The worker that ran a job: the `worker` of its `running` status event."""
    events = c.get(f"{path}/{job_id}/events").json()["data"]
    running = [
        e["data"]["worker"] for e in events if e["type"] == "status" and e["data"].get("status") == "running"
    ]
    assert running, events
    return str(running[-1])


def _image(s: Stack, c: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create an image job (held up to 60 s, then polled) and require that it succeeded."""
    # the client waits longer than the server holds the request (60 s), or a slow job is a client timeout
    r = c.post("/v1/images", json=body, headers={"Prefer": "wait=60"}, timeout=90)
    assert r.status_code in (200, 202), r.text
    job = r.json() if r.status_code == 200 else s.wait_job(r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", (job, s.logs())
    return dict(job)


def _sse_metrics(s: Stack, job_id: str, want: int, timeout: float = 150) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    event = ""
    with (
        s.client(timeout=timeout) as c,
        c.stream("GET", f"/v1/train-jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.headers
        deadline = time.monotonic() + timeout
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "metrics":
                out.append(json.loads(line.split(":", 1)[1]))
                if len(out) >= want:
                    break
            assert time.monotonic() < deadline, out
    return out


@contextlib.contextmanager
def _rank_stacks_on_failure(s: Stack, job_id: str, ranks: dict[int, Any]) -> Iterator[None]:
    """A failure inside reports every rank's Python stacks (SIGUSR1: hdm_core.train's faulthandler) from train.log."""
    try:
        yield
    except Exception as exc:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        log = Path(s.env["HDM_RUNS_DIR"]) / job_id / "train.log"
        tail = log.read_text(errors="replace")[-12000:] if log.exists() else "(no train.log)"
        raise AssertionError(f"{exc!r}\n--- train.log with the ranks' stacks ---\n{tail}") from exc


# -- tests -----------------------------------------------------------------------------------------------------
def test_two_rank_ddp_train_job_streams_metrics_and_serves_its_checkpoint(
    two_workers: Stack, dataset: str
) -> None:
    s = two_workers
    with s.client() as c:
        r = c.post("/v1/train-jobs", json=_train_body(dataset, 6, gpus=2))
        assert r.status_code == 202, r.text
        job = r.json()
        procs, ranks = _wait_ranks(s, job["id"], 2)
        # 2-process DDP via torchrun: one launcher, two ranks 0 and 1 of a world of 2
        assert sorted(r["RANK"] for r in ranks.values()) == ["0", "1"], (procs, ranks)
        assert {r["WORLD_SIZE"] for r in ranks.values()} == {"2"}, ranks
        assert sum("torch.distributed.run" in cmd for cmd in procs.values()) == 1, procs
        assert all("--nproc_per_node=2" in cmd for cmd in procs.values() if "torch.distributed.run" in cmd), (
            procs
        )
        running = c.get(f"/v1/train-jobs/{job['id']}").json()
        assert sorted(running["gpus"]) == [0, 1], running

        with _rank_stacks_on_failure(s, job["id"], ranks):
            metrics = _sse_metrics(s, job["id"], 3)
            assert len(metrics) == 3 and all(m["job_id"] == job["id"] and "loss" in m for m in metrics), (
                metrics
            )
            assert [m["step"] for m in metrics] == sorted(m["step"] for m in metrics), metrics
            done = s.wait_job(job["id"], timeout=240, path="/v1/train-jobs")
        assert done["status"] == "succeeded", (done, s.logs())
        assert done["step"] == 6 and sorted(done["gpus"]) == [0, 1], done
        manifest = json.loads(
            (Path(s.env["HDM_RUNS_DIR"]) / job["id"] / "checkpoints" / "manifest.json").read_text()
        )
        assert manifest["checkpoints"] and all(
            e["world_size"] == 2 and len(e["rank_fingerprints"]) == 2 for e in manifest["checkpoints"]
        ), manifest

        ckpts = c.get(f"/v1/train-jobs/{job['id']}/checkpoints").json()["data"]
        assert 6 in {k["step"] for k in ckpts}, ckpts
        assert all(k["source"] == "train_job" and k["train_job"] == job["id"] for k in ckpts), ckpts
        model = next(k for k in ckpts if k["step"] == 6)
        img = _image(
            s, c, {"prompt": "a red square", "model": model["id"], "width": 32, "height": 32, "steps": 2}
        )
        png = c.get(f"/v1/images/{img['id']}/files/0")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert all(g["job"] is None for g in c.get("/v1/system").json()["gpus"])


def test_two_rank_adapter_job_builds_half_of_the_text_cache_on_each_rank(two_workers: Stack) -> None:
    """[cache] on a 2-rank adapter job: each rank encodes about half of the caption variants the run reads (the
    counts arrive as the job's `cache` events), and the adapter is registered as usual. The base is pixel-space,
    so its latents are the crops themselves: the text cache is what there is to build."""
    s = two_workers
    root = Path(s.env["HDM_DATA_ROOT"]) / "captions16"
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(16):  # 16 distinct captions: 16 cache keys to share out
        Image.new("RGB", (32, 32), COLORS[names[i % 4]]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {names[i % 4]} square, number {i}")
    with s.client() as c:
        ds = c.post("/v1/datasets", json={"name": "captions16", "path": "captions16"}).json()
        ds = s.wait_job(ds["id"], ("ready", "invalid"), timeout=120, path="/v1/datasets")
        assert ds["status"] == "ready", ds
        body = {
            "name": "cached-adapter",
            "base_model": "tiny",
            "dataset": ds["id"],
            "precision": "fp32",
            "seed": 3,
            "gpus": 2,
            "text_max_length": 16,
            "checkpoint_every": 100,
            "adapter": {},
            "cache": {"latents": True, "text": True},
            "stages": [{"resolution": 16, "steps": 4, "batch_size": 4, "warmup_steps": 0}],
        }
        r = c.post("/v1/train-jobs", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        done = s.wait_job(job["id"], timeout=300, path="/v1/train-jobs")
        assert done["status"] == "succeeded", (done, s.logs())
        assert sorted(done["gpus"]) == [0, 1] and done["adapters"], done
        events = c.get(f"/v1/train-jobs/{job['id']}/events").json()["data"]
    cache = [e["data"] for e in events if e["type"] == "cache"]
    (built,) = [d for d in cache if d["cache"] == "built"]
    assert built["latents"] == [0, 0], built  # pixel codec: nothing to cache
    text = built["text"]
    print(f"records built per rank: {built}")
    # 4 steps x global batch 8 = 32 samples: 2 epochs of the 16 images, each caption and its dropout variant
    assert len(text) == 2 and 16 <= sum(text) <= 32, built
    assert all(0.35 * sum(text) <= n <= 0.65 * sum(text) for n in text), built
    assert [d["rank"] for d in cache if d["cache"] == "text"] and all(d["rank"] == 0 for d in cache[:-1])
    assert not any(e["type"] == "metrics" and e["data"].get("kind") == "cache" for e in events), events


def test_cancel_kills_the_whole_trainer_group_and_frees_both_leases(two_workers: Stack, dataset: str) -> None:
    s = two_workers
    with s.client() as c:
        job = c.post(
            "/v1/train-jobs", json=_train_body(dataset, 100000, gpus=2, checkpoint_every=100000)
        ).json()
        procs, ranks = _wait_ranks(s, job["id"], 2)
        s.wait_job(job["id"], ("running",), timeout=150, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        launcher = next(pid for pid, cmd in procs.items() if "torch.distributed.run" in cmd)
        st = _stat(launcher)
        assert st is not None and st[2] == launcher, (launcher, st)  # the worker starts torchrun as a group
        group = _tree(launcher)  # torchrun, its two ranks, anything they started
        assert set(ranks) <= set(group) and launcher in group and len(group) >= 3, (group, ranks)
        system = c.get("/v1/system").json()["gpus"]
        assert [g["job"] for g in system] == [job["id"], job["id"]], system

        t0 = time.monotonic()
        assert c.post(f"/v1/train-jobs/{job['id']}/cancel").status_code in (200, 202)
        done = s.wait_job(job["id"], timeout=90, path="/v1/train-jobs")
        assert done["status"] == "cancelled", (done, s.logs())
        assert time.monotonic() - t0 < 60
        deadline = time.monotonic() + 5  # already dead; allow the reaper a moment
        while alive := {pid: _cmdline(pid) for pid in group if (x := _stat(pid)) is not None and x[0] != "Z"}:
            assert time.monotonic() < deadline, f"still running after cancel: {alive} (group was {group})"
            time.sleep(0.1)
        assert _tree(launcher) == {}
        system = c.get("/v1/system").json()["gpus"]
        assert [g["job"] for g in system] == [None, None], system
        # and the freed slots serve again
        _image(s, c, {"prompt": "after", "width": 32, "height": 32, "steps": 2})


def test_image_jobs_run_on_the_other_slot_while_training_holds_one(two_workers: Stack, dataset: str) -> None:
    s = two_workers
    with s.client() as c:
        job = c.post(
            "/v1/train-jobs", json=_train_body(dataset, 100000, gpus=1, checkpoint_every=100000)
        ).json()
        s.wait_job(job["id"], ("running",), timeout=150, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        train = c.get(f"/v1/train-jobs/{job['id']}").json()
        assert train["gpus"] == [0], train
        train_worker = _worker_of(c, "/v1/train-jobs", job["id"])
        assert train_worker.startswith("slot0-"), train_worker
        assert [g["job"] for g in c.get("/v1/system").json()["gpus"]] == [job["id"], None]

        ids = []
        for i in range(4):
            r = c.post(
                "/v1/images", json={"prompt": f"square {i}", "width": 32, "height": 32, "steps": 2, "seed": i}
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        seen_slot1 = set()
        deadline = time.monotonic() + 120
        while True:
            system = c.get("/v1/system").json()["gpus"]
            assert system[0]["job"] == job["id"], system  # training keeps slot 0 the whole time
            if system[1]["job"] in ids:
                seen_slot1.add(system[1]["job"])
            imgs = [c.get(f"/v1/images/{i}").json() for i in ids]
            if all(im["status"] in ("succeeded", "failed", "cancelled") for im in imgs):
                break
            assert time.monotonic() < deadline, (imgs, s.logs())
            time.sleep(0.1)
        assert [im["status"] for im in imgs] == ["succeeded"] * 4, imgs
        workers = {i: _worker_of(c, "/v1/images", i) for i in ids}
        assert all(w.startswith("slot1-") for w in workers.values()), workers
        assert seen_slot1, "GET /v1/system never showed an image job on slot 1"
        still = c.get(f"/v1/train-jobs/{job['id']}").json()
        assert still["status"] == "running" and still["gpus"] == [0], still

        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        assert s.wait_job(job["id"], timeout=90, path="/v1/train-jobs")["status"] == "cancelled"
        assert [g["job"] for g in c.get("/v1/system").json()["gpus"]] == [None, None]


STUBBORN_RANK = """
import json, os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank that does not stop on SIGTERM (e.g. hung in a collective)
run = Path(sys.argv[sys.argv.index("--run-dir") + 1])
step = 0
while True:
    step += 1
    if os.environ.get("RANK") == "0":
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\\n")
    time.sleep(0.2)
"""


def test_cancel_sigkills_ranks_that_ignore_sigterm(two_workers: Stack, dataset: str, tmp_path: Path) -> None:
    """torchrun (torch >= 2) starts every rank in a session of its own: the SIGKILL after the grace period must
    reach the ranks too, not only the launcher's process group."""
    import signal

    s = two_workers
    script = tmp_path / "stubborn_rank.py"
    script.write_text(STUBBORN_RANK)
    old = next(p for p in s.workers if p.poll() is None and "slot0-" in " ".join(map(str, p.args)))
    s.kill_worker(old, signal.SIGTERM)
    w0 = s.start_worker(
        0,
        extra_env={
            "HDM_TRAIN_COMMAND": f"{{python}} -m torch.distributed.run --standalone --nproc_per_node={{nproc}} {script} "
            "{config} --run-dir {run_dir}",
            "HDM_TRAIN_KILL_GRACE_S": "2",
        },
    )
    group: dict[int, str] = {}
    try:
        with s.client() as c:
            job = c.post("/v1/train-jobs", json=_train_body(dataset, 1000, gpus=2)).json()
            s.wait_job(
                job["id"], ("running",), timeout=150, path="/v1/train-jobs", pred=lambda j: j["step"] >= 2
            )
            deadline = time.monotonic() + 30
            while len(group) < 3:
                assert time.monotonic() < deadline, group
                launcher = next(
                    (
                        pid
                        for pid in _all_pids()
                        if "torch.distributed.run" in _cmdline(pid) and _descends_from(pid, w0.pid)
                    ),
                    None,
                )
                group = _tree(launcher) if launcher else {}
                time.sleep(0.1)
            c.post(f"/v1/train-jobs/{job['id']}/cancel")
            done = s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")
            assert done["status"] == "cancelled", done
            deadline = time.monotonic() + 10  # grace 2 s, then SIGKILL: nothing may be left well after that
            while alive := {
                pid: (_stat(pid), _cmdline(pid))
                for pid in group
                if (st := _stat(pid)) is not None and st[0] != "Z"
            }:
                assert time.monotonic() < deadline, (
                    f"trainer processes survived the cancel (job {done['status']}, leases "
                    f"{c.get('/v1/system').json()['gpus']}): {alive}"
                )
                time.sleep(0.2)
            assert [g["job"] for g in c.get("/v1/system").json()["gpus"]] == [None, None]
    finally:
        for pid in group:  # processes this test started: never leave orphans behind
            st = _stat(pid)
            cmd = _cmdline(pid)
            if st is not None and st[0] != "Z" and ("stubborn_rank" in cmd or "torch.distributed.run" in cmd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        s.kill_worker(w0, signal.SIGTERM)
        s.start_worker(0)
