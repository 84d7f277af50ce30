"""Multi-node train jobs on the workers (placed by app/services/nodes.py; docs/deployment.md): node 0's watch over
the other nodes (did each take its part in time, is it still alive) and a further node's part (task
``hdm.train_node``): one torchrun per machine, all in one c10d rendezvous hosted by node 0.

Node 0 owns the job row (claim, heartbeat, metrics, checkpoints, the outcome); each further node holds the leases of
its own slots and beats them itself, so a node whose trainer died shows as a stale lease. The run folder is on the
shared storage (HDM_RUNS_DIR): every node reads the config node 0 wrote there and resumes from the same
checkpoints."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from typing import Any

from sqlalchemy import select

from app.db import as_utc, session_scope
from app.models import Job, JobEvent
from app.procutil import kill_tree, process_tree, start_run
from app.services import jobs, leases, nodes
from app.settings import get_settings
from worker.train_config import Rendezvous, command, trainer_env

log = logging.getLogger(__name__)


class NodeFailure(Exception):
    """A node of the job failed it: ``requeue`` (a node was lost: the job starts again from its newest
    checkpoint, as after a lost worker) or not (the job fails with ``error``)."""

    def __init__(self, code: str, message: str, *, requeue: bool = False) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message}
        self.requeue = requeue


def _left(session: Any, job_id: str, attempt: int) -> dict[int, Any]:
    """The nodes whose part of this attempt ended, with their torchrun's exit status (they say so as they go)."""
    rows = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "log"))
    return {
        int(d["node"]): d["left"]
        for d in rows
        if isinstance(d, dict) and "left" in d and d.get("attempt") == attempt
    }


class NodeWatch:
    """Node 0's view of the further nodes of one attempt, checked on every supervisor tick."""

    def __init__(self, job_id: str, attempt: int, worker: str) -> None:
        self.job_id, self.attempt, self.worker = job_id, attempt, worker
        with session_scope() as session:
            job = session.get(Job, job_id)
            self.parts = nodes.parts(job) if job is not None else [[]]
        self.started = time.monotonic()
        self.joined: dict[int, str] = {}
        self.announced: dict[str, Any] = {}

    def rendezvous(self, resume: bool) -> Rendezvous:
        """Node 0's part, announced in the job row (the further nodes wait for it)."""
        settings = get_settings()
        if not settings.node_addr:
            raise NodeFailure(
                "node_addr_missing",
                "this trainer runs node 0 of a multi-node job but has no HDM_NODE_ADDR (the address the other "
                "machines reach it at; docs/deployment.md)",
            )
        rdzv = Rendezvous(
            nnodes=len(self.parts),
            node_rank=0,
            endpoint=f"{settings.node_addr}:{nodes.rendezvous_port(self.parts[0])}",
            run_id=f"{self.job_id}-{self.attempt}",
            local_addr=settings.node_addr,
            join_timeout_s=settings.node_join_timeout_s,
        )
        self.announced = {
            "attempt": self.attempt,
            "endpoint": rdzv.endpoint,
            "id": rdzv.run_id,
            "resume": resume,
        }
        return rdzv

    def announce(self) -> None:
        """The further nodes start their part once the job row carries this attempt's rendezvous (written after
        node 0 prepared the run folder: config, a fresh metrics log)."""
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is not None:
                job.result = {**(job.result or {}), "rdzv": self.announced, "nodes": self.record()}
                session.commit()

    def record(self) -> list[dict[str, Any]]:
        return [
            {"rank": r, "slots": p, "worker": self.worker if r == 0 else self.joined.get(r)}
            for r, p in enumerate(self.parts)
        ]

    def _states(self) -> dict[int, str]:
        """Per further node: waiting (not joined yet), running, left (ended, exit 0), failed (ended otherwise) or
        lost (stale or gone without a word)."""
        stale = jobs.stale_before(get_settings().stale_after_s)
        with session_scope() as session:
            rows = {row.slot: row for row in leases.held(session, self.job_id)}
            left = _left(session, self.job_id, self.attempt)
            out = {}
            for rank, part in enumerate(self.parts[1:], start=1):
                mine = [rows.get(s) for s in part]
                taken = [r for r in mine if r is not None and r.worker]
                if rank in left:
                    out[rank] = "left" if left[rank] == 0 else "failed"
                elif len(taken) == len(part) and all(
                    (as_utc(r.heartbeat_at) or stale) > stale for r in taken
                ):
                    out[rank] = "running"
                    if rank not in self.joined:
                        self.joined[rank] = str(taken[0].worker)
                        job = session.get(Job, self.job_id)
                        if job is not None:
                            job.result = {**(job.result or {}), "nodes": self.record()}
                            session.commit()
                elif rank in self.joined:
                    out[rank] = "lost"
                else:
                    out[rank] = "waiting"
            return out

    def check(self) -> None:
        states = self._states()
        lost = [r for r, s in states.items() if s == "lost"]
        if lost:
            raise self._lost(lost)
        if failed := [r for r, s in states.items() if s == "failed"]:
            # its ranks are gone while node 0's wait in a collective (gloo/NCCL time out only after many minutes)
            names = ", ".join(nodes.describe(self.parts[r], r) for r in failed)
            raise NodeFailure("node_failed", f"the trainer of {names} failed; the run stopped on every node")
        waiting = [r for r, s in states.items() if s == "waiting"]
        timeout = get_settings().node_join_timeout_s
        if waiting and time.monotonic() - self.started > timeout:
            names = ", ".join(nodes.describe(self.parts[r], r) for r in waiting)
            raise NodeFailure(
                "node_join_timeout",
                f"{names} did not join within {timeout:g} s (HDM_NODE_JOIN_TIMEOUT_S): is the trainer of that "
                "machine running and consuming that queue?",
            )

    def settle(self) -> None:
        """After node 0's trainer failed: wait until each further node said its part ended or went stale; a
        lost node re-queues the job (its trainer died, as a lost worker does on one machine)."""
        settings = get_settings()
        deadline = time.monotonic() + settings.stale_after_s + 2 * settings.heartbeat_s + 2
        while True:
            states = self._states()
            if lost := [r for r, s in states.items() if s == "lost"]:
                raise self._lost(lost)
            if (
                all(s in ("left", "failed", "waiting") for s in states.values())
                or time.monotonic() > deadline
            ):
                return
            time.sleep(0.5)

    def _lost(self, ranks: list[int]) -> NodeFailure:
        names = ", ".join(f"{nodes.describe(self.parts[r], r)} on {self.joined.get(r)}" for r in ranks)
        return NodeFailure("node_lost", f"{names} stopped taking part", requeue=True)


def conclude(job_id: str, attempt: int, failure: NodeFailure) -> str:
    """The job after a node failure, once node 0's trainer is gone and the leases are free."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return "failed"
        if job.cancel_requested_at is not None:  # the other nodes stopped because of the cancel
            jobs.finish(session, job_id, "cancelled", attempt=attempt)
            return "cancelled"
        if failure.requeue and job.attempts < settings.max_attempts:
            log.warning("job %s: %s; re-queueing", job_id, failure.error["message"])
            jobs.add_event(session, job_id, "log", {"message": failure.error["message"]})
            jobs.requeue(session, job, "node_lost")
            return "requeued"
        jobs.finish(session, job_id, "failed", error=failure.error, attempt=attempt)
    return "failed"


def _local(part: list[int]) -> bool:
    """This worker serves the part: a pinned worker its one slot, the trainer service its machine's slots."""
    settings = get_settings()
    local = [settings.gpu_index] if settings.gpu_index is not None else settings.local_slot_list
    return all(s in local for s in part)


def _wait_for_node0(job_id: str, rank: int) -> tuple[int, list[list[int]], dict[str, Any]] | None:
    """(attempt, parts, rendezvous) once node 0 announced its rendezvous; None when the job is no longer
    waiting for this node (final, rescheduled elsewhere) or node 0 never started within the join timeout."""
    deadline = time.monotonic() + get_settings().node_join_timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in ("queued", "running") or not job.slots:
                return None
            parts = nodes.parts(job)
            if rank >= len(parts) or not _local(parts[rank]):
                return None
            info = dict((job.result or {}).get("rdzv") or {})
            if job.status == "running" and info.get("attempt") == job.attempts:
                return job.attempts, parts, info
        time.sleep(0.5)
    return None


def run_node_part(job_id: str, rank: int, *, worker: str) -> str:
    """Node ``rank`` (> 0) of a multi-node job: join node 0's rendezvous with this machine's part of the slots."""
    settings = get_settings()
    found = _wait_for_node0(job_id, rank)
    if found is None:
        log.info("job %s: node %d has nothing to join", job_id, rank)
        return "skipped"
    attempt, parts, info = found
    part = parts[rank]
    with session_scope() as session:
        if not all(leases.join(session, s, job_id, worker) for s in part):
            leases.release(session, job_id, worker=worker)
            log.warning("job %s: node %d %s was taken by another worker or job", job_id, rank, part)
            return "bounced"  # node 0's watch fails the job when this node does not join
    rc: int | None = None
    tree: dict[int, int] = {}
    try:
        run_dir = settings.runs_dir / job_id
        rdzv = Rendezvous(
            nnodes=len(parts),
            node_rank=rank,
            endpoint=str(info["endpoint"]),
            run_id=str(info["id"]),
            local_addr=settings.node_addr,
            join_timeout_s=settings.node_join_timeout_s,
        )
        cmd = command(run_dir / "config.toml", run_dir, len(part), bool(info.get("resume")), rdzv)
        env = trainer_env(part, dict(os.environ))
        log.info("job %s node %d: %s", job_id, rank, shlex.join(cmd))
        rc = _run(job_id, attempt, worker, cmd, env, run_dir / f"train.node{rank}.log", tree)
    except Exception:
        log.exception("job %s: node %d's part failed", job_id, rank)
    finally:
        kill_tree(tree, signal.SIGKILL)
        with session_scope() as session:  # said before the leases go: node 0 must not take it for a lost node
            msg = f"node {rank} ({worker}) left: trainer exit {rc}"
            jobs.add_event(
                session, job_id, "log", {"message": msg, "node": rank, "attempt": attempt, "left": rc}
            )
            session.commit()
            leases.release(session, job_id, worker=worker)
    return "done" if rc == 0 else "failed"


def _run(
    job_id: str,
    attempt: int,
    worker: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Any,
    tree: dict[int, int],
) -> int | None:
    """Run this node's torchrun while the job runs this attempt; SIGTERM when it is cancelled, final or started
    again, SIGKILL after HDM_TRAIN_KILL_GRACE_S."""
    settings = get_settings()
    with log_path.open("ab") as logf:
        proc = start_run(cmd, cwd=log_path.parent, log=logf, env=env)
        tree |= process_tree(proc.pid)
        stop_at: float | None = None
        while proc.poll() is None:
            time.sleep(0.5)
            tree |= process_tree(proc.pid)
            with session_scope() as session:
                leases.beat(session, job_id, worker=worker)
                job = session.get(Job, job_id)
                go_on = (
                    job is not None
                    and job.status == "running"
                    and job.attempts == attempt
                    and job.cancel_requested_at is None
                )
            if not go_on and stop_at is None:
                stop_at = time.monotonic()
                os.killpg(proc.pid, signal.SIGTERM)
            elif stop_at is not None and time.monotonic() - stop_at > settings.train_kill_grace_s:
                kill_tree(tree | process_tree(proc.pid), signal.SIGKILL)
    return proc.returncode
