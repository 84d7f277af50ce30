"""Two machines, as network namespaces made by the test (tests/service/netns_hosts.py): host A runs PostgreSQL,
Redis and the API bound to its own address, an image worker (slot 0) and a trainer (slots 0,1); host B runs an
image worker (slot 2) and a trainer (slots 2,3). Nothing of the stack listens on or talks to 127.0.0.1: host B
has no loopback services at all, so a default that leaked would fail here. The test process itself talks to
the API from inside host A.

Shown: image jobs submitted to A's API run on B's worker too; a train job with ``nodes: 2, gpus: 1`` (gloo on
CPU, one c10d rendezvous on A's address) runs one rank per host, has the loss sequence of the same job with
``nodes: 1, gpus: 2``, and resumes exactly after B's trainer is SIGKILLed mid-run; a node that never joins fails
the job within the join timeout with an error naming the node, and every lease is free again."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_hosts import Hosts, inside, leftovers, preexec, two_hosts
from PIL import Image
from service_stack import API_KEY, Stack, stack_env

JOIN_TIMEOUT_S = 20
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


class Cluster:
    def __init__(self, stack: Stack, hosts: Hosts, env: dict[str, dict[str, str]]) -> None:
        self.stack, self.hosts, self.env = stack, hosts, env
        self.trainers: dict[str, Any] = {}
        self.image_workers: dict[str, Any] = {}
        self.root_net = 0

    def start_trainer(self, host: str) -> None:
        h = self.hosts.a if host == "A" else self.hosts.b
        p = self.stack.start_worker(
            trainer=True, name=f"{host}-", extra_env=self.env[host], preexec=preexec(h.ns)
        )
        self.trainers[host] = p
        _wait_ready(self.stack, f"{host}-trainer")

    def kill_trainer(self, host: str) -> None:
        self.stack.kill_worker(self.trainers.pop(host), signal.SIGKILL)


def _wait_ready(s: Stack, log_name: str, timeout: float = 120) -> None:
    """Until the newest Celery worker logging to ``NN-<log_name>.log`` says it consumes its queues."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = sorted(s.workdir.glob(f"*-{log_name}.log"))
        if logs and " ready." in logs[-1].read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"worker {log_name} never became ready\n{s.logs()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("multinode")
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests create network namespaces (ip netns): run them as root, as CI does")
    with two_hosts(tmp) as hosts:
        prefix = f"hdmn{secrets.token_hex(4)}"
        env = stack_env(tmp, assets, hosts.database_url, hosts.redis_url, prefix)
        env.update(
            {
                "HDM_SLOTS": "0,1,2,3",
                "HDM_SLOT_GROUPS": "0,1;2,3",  # machine A: slots 0,1; machine B: slots 2,3
                "HDM_CPU_THREADS": "1",
                "HDM_TRAIN_KILL_GRACE_S": "10",
                "HDM_NODE_JOIN_TIMEOUT_S": str(JOIN_TIMEOUT_S),
                "HDM_RDZV_PORT": "29400",
            }
        )
        per_host = {
            h.name: {
                "HDM_NODE_ADDR": h.addr,
                "GLOO_SOCKET_IFNAME": h.ifname,
                "HDM_LOCAL_SLOTS": "0,1" if h.name == "A" else "2,3",
            }
            for h in (hosts.a, hosts.b)
        }
        s = Stack(env, tmp, API_KEY)
        c = Cluster(s, hosts, per_host)
        c.root_net = os.stat("/proc/self/ns/net").st_ino  # this machine's own network, before entering A
        # the test process is a client on host A: every socket it opens from here on is inside A's namespace
        with inside(hosts.a.ns):
            try:
                s.migrate()
                s.start_api(host=hosts.a.addr, preexec=preexec(hosts.a.ns, signal.SIGKILL))
                for h, slot in ((hosts.a, 0), (hosts.b, 2)):
                    c.image_workers[h.name] = s.start_worker(
                        slot,
                        queues=f"{prefix}.gpu.{slot},{prefix}.images",
                        name=f"{h.name}-",
                        extra_env=per_host[h.name],
                        preexec=preexec(h.ns),
                    )
                for name in ("A", "B"):
                    _wait_ready(s, f"{name}-worker{0 if name == 'A' else 2}")
                    c.start_trainer(name)
                yield c
            finally:
                s.stop()
    left = leftovers(hosts)
    assert not left, f"namespaces/links left behind: {left}"


@pytest.fixture(scope="module")
def dataset(cluster: Cluster) -> str:
    s = cluster.stack
    root = Path(s.env["HDM_DATA_ROOT"]) / "squares"
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(16):
        Image.new("RGB", (32, 32), COLORS[names[i % 4]]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {names[i % 4]} square")
    with s.client() as c:
        ds = c.post("/v1/datasets", json={"name": "squares", "path": "squares"}).json()
        deadline = time.monotonic() + 120
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    return str(ds["id"])


def _body(dataset: str, steps: int, gpus: int, nodes: int, **kw: object) -> dict[str, Any]:
    return {
        "name": "squares",
        "arch": "xut-pixel-debug",
        "dataset": dataset,
        "precision": "fp32",
        "seed": 3,
        "checkpoint_every": 3,
        "keep_last_n": 2,
        "gpus": gpus,
        "nodes": nodes,
        "text_max_length": 16,
        "stages": [{"resolution": 16, "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}],
        **kw,
    }


def _events(c: Any, path: str, job_id: str) -> list[dict[str, Any]]:
    return list(c.get(f"{path}/{job_id}/events", params={"limit": 1000}).json()["data"])


def _worker_of(c: Any, path: str, job_id: str) -> str:
    running = [
        e["data"]["worker"]
        for e in _events(c, path, job_id)
        if e["type"] == "status" and e["data"].get("status") == "running"
    ]
    assert running, job_id
    return str(running[-1])


def _losses(c: Any, job_id: str) -> dict[int, float]:
    return {
        e["data"]["step"]: e["data"]["loss"]
        for e in _events(c, "/v1/train-jobs", job_id)
        if e["type"] == "metrics"
    }


def _file_losses(s: Stack, job_id: str) -> dict[int, float]:
    lines = (Path(s.env["HDM_RUNS_DIR"]) / job_id / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if isinstance(r.get("step"), int)}


def _pids_below(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[0] != "Z":
                kids.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _parent_is_torchrun(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        return b"torch.distributed.run" in Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _ranks_of(pid: int) -> list[dict[str, Any]]:
    """Trainer rank processes below a worker: their RANK, WORLD_SIZE and network namespace."""
    out = []
    for p in _pids_below(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            raw = Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace")
            ns = os.stat(f"/proc/{p}/ns/net").st_ino
        except OSError:
            continue
        if b"hdm_core.train" not in cmd or b"torch.distributed.run" in cmd or not _parent_is_torchrun(p):
            continue  # the ranks are torchrun's children (not their own helpers, which inherit RANK)
        env = dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)
        if "RANK" in env:
            out.append({"pid": p, "RANK": env["RANK"], "WORLD_SIZE": env.get("WORLD_SIZE"), "netns": ns})
    return out


def _free_leases(c: Any) -> list[Any]:
    return [g["job"] for g in c.get("/v1/system").json()["gpus"]]


def test_image_jobs_submitted_to_a_run_on_b_too(cluster: Cluster) -> None:
    s, hosts = cluster.stack, cluster.hosts
    for name, h in (("A", hosts.a), ("B", hosts.b)):  # each worker really runs in its host's namespace
        assert os.stat(f"/proc/{cluster.image_workers[name].pid}/ns/net").st_ino == h.net_inode()
    assert hosts.a.net_inode() != hosts.b.net_inode() != cluster.root_net
    with s.client() as c:
        ids = []
        for i in range(8):
            r = c.post(
                "/v1/images", json={"prompt": f"square {i}", "width": 32, "height": 32, "steps": 2, "seed": i}
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        for i in ids:
            assert s.wait_job(i, timeout=180)["status"] == "succeeded", s.logs()
            assert c.get(f"/v1/images/{i}/files/0").content[:8] == b"\x89PNG\r\n\x1a\n"
        ran_on = {i: _worker_of(c, "/v1/images", i) for i in ids}
    table = "\n".join(f"{i}  {w.split('-', 1)[0]}  {w}" for i, w in ran_on.items())
    print(f"\njob -> host (worker)\n{table}")
    assert {w.split("-", 1)[0] for w in ran_on.values()} == {"A", "B"}, table


def test_two_node_run_matches_one_node_and_resumes_after_b_trainer_sigkill(
    cluster: Cluster, dataset: str
) -> None:
    s, hosts = cluster.stack, cluster.hosts
    steps = 12
    with s.client() as c:
        one = c.post("/v1/train-jobs", json=_body(dataset, steps, gpus=2, nodes=1)).json()
        assert "id" in one, one
        done1 = s.wait_job(one["id"], timeout=300, path="/v1/train-jobs")
        assert done1["status"] == "succeeded", (done1, s.logs())
        assert done1["nodes"][0]["slots"] == done1["gpus"] and len(done1["gpus"]) == 2, done1
        ref = _losses(c, one["id"])
        assert sorted(ref) == list(range(1, steps + 1)), ref

        r = c.post("/v1/train-jobs", json=_body(dataset, steps, gpus=1, nodes=2))
        assert r.status_code == 202, r.text
        two = r.json()
        s.wait_job(two["id"], ("running",), timeout=180, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        ranks = {h: _ranks_of(cluster.trainers[h].pid) for h in ("A", "B")}
        # one rank on each host, in that host's namespace, of one world of 2
        assert [len(ranks["A"]), len(ranks["B"])] == [1, 1], ranks
        assert sorted(r[0]["RANK"] for r in ranks.values()) == ["0", "1"], ranks
        assert {r[0]["WORLD_SIZE"] for r in ranks.values()} == {"2"}, ranks
        assert ranks["A"][0]["netns"] == hosts.a.net_inode() and ranks["B"][0]["netns"] == hosts.b.net_inode()
        view = c.get(f"/v1/train-jobs/{two['id']}").json()
        assert [(n["rank"], n["slots"]) for n in view["nodes"]] == [(0, [0]), (1, [2])], view
        assert view["nodes"][0]["worker"].startswith("A-trainer") and view["nodes"][1]["worker"].startswith(
            "B-trainer"
        ), view
        assert _free_leases(c) == [two["id"], None, two["id"], None]
        # an image job meanwhile: both image workers' slots are leased to the run, so it waits (bounces)
        img = c.post("/v1/images", json={"prompt": "wait", "width": 32, "height": 32, "steps": 2}).json()

        s.wait_job(two["id"], ("running",), timeout=180, path="/v1/train-jobs", pred=lambda j: j["step"] >= 4)
        assert c.get(f"/v1/images/{img['id']}").json()["status"] == "queued"
        killed_at = c.get(f"/v1/train-jobs/{two['id']}").json()["step"]
        cluster.kill_trainer(
            "B"
        )  # SIGKILL of B's trainer service (its torchrun gets SIGTERM as its parent dies)
        cluster.start_trainer("B")
        done2 = s.wait_job(two["id"], timeout=300, path="/v1/train-jobs")
        assert done2["status"] == "succeeded", (done2, s.logs())
        events = _events(c, "/v1/train-jobs", two["id"])
        requeued = [e for e in events if e["type"] == "status" and e["data"].get("reason") == "node_lost"]
        assert requeued and done2["attempts"] == 2, events
        assert killed_at < steps, killed_at
        got = _losses(c, two["id"])
        assert got == ref, (got, ref)  # every step once, the same losses as on one machine
        assert _file_losses(s, two["id"]) == ref  # the resumed attempt's own log, from its checkpoint on
        launched = [
            line
            for log in s.workdir.glob("*trainer.log")
            for line in log.read_text(errors="replace").splitlines()
            if f"job {two['id']}" in line and "torch.distributed.run" in line
        ]
        # attempt 1 on both nodes, then both again from the newest checkpoint (--resume), not from scratch
        assert sum("--resume" in line for line in launched) == 2 and len(launched) == 4, launched
        assert s.wait_job(img["id"], timeout=120)["status"] == "succeeded"
        assert _free_leases(c) == [None] * 4
        print(f"\nloss per step, nodes 1 x 2 and nodes 2 x 1 (B's trainer killed at step {killed_at}):")
        for k in sorted(ref):
            print(f"{k:3d}  {ref[k]:.6f}  {got[k]:.6f}")


def test_cancel_stops_both_nodes_and_frees_every_lease(cluster: Cluster, dataset: str) -> None:
    s = cluster.stack
    with s.client() as c:
        job = c.post(
            "/v1/train-jobs", json=_body(dataset, 100000, gpus=1, nodes=2, checkpoint_every=100000)
        ).json()
        s.wait_job(job["id"], ("running",), timeout=180, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        assert [len(_ranks_of(cluster.trainers[h].pid)) for h in ("A", "B")] == [1, 1]
        assert c.post(f"/v1/train-jobs/{job['id']}/cancel").status_code in (200, 202)
        done = s.wait_job(job["id"], timeout=90, path="/v1/train-jobs")
        assert done["status"] == "cancelled", (done, s.logs())
        deadline = time.monotonic() + 30  # node 1 notices the cancel on its next tick
        while any(_ranks_of(cluster.trainers[h].pid) for h in ("A", "B")) or _free_leases(c) != [None] * 4:
            assert time.monotonic() < deadline, (_free_leases(c), s.logs())
            time.sleep(0.2)


def test_sigkill_of_one_rank_on_b_fails_the_job_resumably(cluster: Cluster, dataset: str) -> None:
    s = cluster.stack
    with s.client() as c:
        body = _body(dataset, 100000, gpus=1, nodes=2, checkpoint_every=100000)
        job = c.post("/v1/train-jobs", json=body).json()
        s.wait_job(job["id"], ("running",), timeout=180, path="/v1/train-jobs", pred=lambda j: j["step"] >= 1)
        (rank,) = _ranks_of(cluster.trainers["B"].pid)
        os.kill(rank["pid"], signal.SIGKILL)
        done = s.wait_job(job["id"], timeout=90, path="/v1/train-jobs")
        assert done["status"] == "failed" and done["error"]["code"] == "node_failed", done
        assert "node 1 (slots [2]" in done["error"]["message"], done
        assert done["attempts"] == 1, done  # every node's trainer lived: not a lost node, no automatic retry
        deadline = time.monotonic() + 30
        while _free_leases(c) != [None] * 4:
            assert time.monotonic() < deadline, _free_leases(c)
            time.sleep(0.2)
        r = c.post(f"/v1/train-jobs/{job['id']}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        c.post(f"/v1/train-jobs/{job['id']}/cancel")
        assert s.wait_job(job["id"], timeout=60, path="/v1/train-jobs")["status"] == "cancelled"


def test_a_node_that_never_joins_fails_the_job_and_frees_every_lease(cluster: Cluster, dataset: str) -> None:
    s = cluster.stack
    cluster.kill_trainer("B")  # machine B's trainer is down: nobody takes node 1's part
    with s.client() as c:
        job = c.post("/v1/train-jobs", json=_body(dataset, 1000, gpus=1, nodes=2)).json()
        s.wait_job(job["id"], ("running",), timeout=120, path="/v1/train-jobs")
        t0 = time.monotonic()
        done = s.wait_job(job["id"], timeout=JOIN_TIMEOUT_S + 60, path="/v1/train-jobs")
        waited = time.monotonic() - t0
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "node_join_timeout", done
        assert "node 1 (slots [2]" in done["error"]["message"], done
        assert waited < JOIN_TIMEOUT_S + 15, waited
        assert _free_leases(c) == [None] * 4
        assert _ranks_of(cluster.trainers["A"].pid) == []
        assert c.get(f"/v1/train-jobs/{job['id']}").json()["nodes"][0]["slots"] == [0]


def test_layouts_the_machines_cannot_hold_are_refused(cluster: Cluster, dataset: str) -> None:
    with cluster.stack.client() as c:
        before = len(c.get("/v1/train-jobs", params={"limit": 100}).json()["data"])
        for gpus, nodes, param in ((1, 3, "nodes"), (3, 1, "gpus"), (3, 2, "nodes"), (2, 3, "nodes")):
            r = c.post("/v1/train-jobs", json=_body(dataset, 4, gpus=gpus, nodes=nodes))
            assert r.status_code == 422 and r.json()["error"]["param"] == param, (gpus, nodes, r.text)
        assert len(c.get("/v1/train-jobs", params={"limit": 100}).json()["data"]) == before
