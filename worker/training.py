"""Supervise a train job's run: start ``torchrun -m hdm_core.train`` (config and command: worker/train_config.py)
as its own process group and watch it (metrics -> events, checkpoints -> models, cancel -> SIGTERM then SIGKILL,
preemption -> back to the queue, heartbeats)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db import session_scope
from app.models import Adapter, Checkpoint, Job, JobEvent
from app.procutil import alive, kill_tree, process_tree, start_run
from app.services import adapters, jobs, leases, models, registry
from app.settings import get_settings
from hdm_core.train.config import write_config
from worker import metrics
from worker.claim import claim
from worker.heartbeat import Heartbeat
from worker.nodes import NodeFailure, NodeWatch, conclude
from worker.train_config import command, trainer_config, trainer_env

log = logging.getLogger(__name__)


class _Supervisor:
    def __init__(self, job_id: str, run_dir: Path) -> None:
        self.job_id, self.run_dir = job_id, run_dir
        self.metrics_offset = 0
        self.metrics_inode: int | None = None
        # Steps already stored as metrics events (by this or an earlier attempt). A resumed trainer rewrites the
        # log up to its checkpoint and runs the steps after it again: those lines are skipped, and only those, so
        # lines an attempt wrote but its dead supervisor never read still become events (issue 10, item 17).
        self.stored: set[int] = set()
        self.cache_stored: set[Any] = set()  # `time` of the cache records already stored as `cache` events
        self.registered: set[str] = set()
        self.latest: dict[str, Any] = {}

    def load_stored(self, session: Any) -> None:
        rows = session.execute(
            select(JobEvent.type, JobEvent.data).where(
                JobEvent.job_id == self.job_id, JobEvent.type.in_(("metrics", "cache"))
            )
        )
        for type_, d in rows:
            key = "step" if type_ == "metrics" else "time"
            if isinstance(d, dict) and isinstance(d.get(key), int | float):
                (self.stored if type_ == "metrics" else self.cache_stored).add(d[key])

    def poll(self) -> None:
        new = self._read_metrics()
        cache = [r for r in new if r.get("kind") == "cache"]
        steps = [r for r in new if r.get("kind") != "cache"]
        with session_scope() as session:
            for rec in new:  # cache build records (progress, every rank's built counts): events of their own
                kind = "cache" if rec.get("kind") == "cache" else "metrics"
                jobs.add_event(session, self.job_id, kind, rec)
            if steps:
                metrics.metrics().train_records(steps)
                self.latest = steps[-1]
                job = session.get(Job, self.job_id)
                if job is not None:
                    job.progress_step = int(self.latest.get("step", job.progress_step))
                    job.result = {**(job.result or {}), "metrics": self.latest, "run_dir": str(self.run_dir)}
            session.commit()
            self.stored |= {r["step"] for r in steps if isinstance(r.get("step"), int)}
            self.cache_stored |= {r.get("time") for r in cache}
            self._register(session)

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        replaced = self.metrics_inode is not None and st.st_ino != self.metrics_inode
        if replaced or st.st_size < self.metrics_offset:
            self.metrics_offset = 0  # rewritten (truncated to the resume checkpoint): read it again
        self.metrics_inode = st.st_ino
        with path.open("rb") as f:
            f.seek(self.metrics_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines
        self.metrics_offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("kind") == "cache":
                if rec.get("time") not in self.cache_stored:
                    out.append(rec)
            elif not (isinstance(step := rec.get("step"), int) and step in self.stored):
                out.append(rec)
        return out

    def _register(self, session: Any) -> None:
        manifest = self.run_dir / "checkpoints" / "manifest.json"
        try:
            entries = json.loads(manifest.read_text())["checkpoints"] if manifest.is_file() else []
        except (ValueError, KeyError, OSError):
            entries = []
        for e in entries:
            name = e.get("name")
            is_adapter = e.get("kind") == "adapter"  # [adapter] runs: the snapshot holds the adapter alone
            file = (
                (e.get("adapter") or {}).get("file", "adapter.safetensors")
                if is_adapter
                else "model.safetensors"
            )
            src = self.run_dir / "checkpoints" / str(name) / str(file)
            if not name or name in self.registered or not src.is_file():
                continue
            dest = get_settings().models_dir / "train" / self.job_id / f"{name}.safetensors"
            if registry.is_deleted(session, "adapter" if is_adapter else "model", dest):
                # deleted through the API: a resumed run must not bring it back
                self.registered.add(name)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:  # a copy: the run's retention (keep_last_n) may delete its own folder later
                if not dest.exists():
                    tmp = dest.with_name(dest.name + ".tmp")
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dest)
                row = self.register(session, dest, name, e.get("step"), is_adapter)
                what = "adapter" if is_adapter else "checkpoint"
                jobs.add_event(
                    session, self.job_id, "log", {"message": f"{what} {row.id} at step {e.get('step')}"}
                )
                session.commit()
                self.registered.add(name)
            except registry.Deleted:
                self.registered.add(name)
            except Exception as exc:
                session.rollback()
                log.warning("registering %s failed: %s", src, exc)

    def register(self, session: Any, path: Path, name: str, step: int | None, is_adapter: bool) -> Any:
        """A file of this run in the registry: an adapter (owned by the job's key) or a checkpoint."""
        if is_adapter:
            job = session.get(Job, self.job_id)
            return adapters.register_file(
                session,
                path,
                name=f"{self.job_id}-{name}",
                owner=job.owner if job else None,
                source="train_job",
                train_job_id=self.job_id,
            )
        return models.register_file(
            session,
            path,
            name=f"{self.job_id}-{name}",
            source="train_job",
            train_job_id=self.job_id,
            step=step,
        )


PREEMPT = "PREEMPT"


def request_preempt(worker: str) -> int:
    """Mark the train jobs this worker runs for preemption (a file the supervisor polls); returns how many."""
    settings = get_settings()
    with session_scope() as session:
        rows = list(
            session.scalars(
                select(Job).where(Job.kind == "train", Job.status == "running", Job.worker == worker)
            )
        )
    for job in rows:
        folder = settings.runs_dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PREEMPT).write_text(worker)
        log.warning("worker %s shutting down: preempting %s", worker, job.id)
    return len(rows)


def run_train_job(job_id: str, *, worker: str) -> str:
    settings = get_settings()
    c = claim(job_id, worker)
    if isinstance(c, str):
        return c
    attempt, req, slots = c.attempt, dict(c.request), c.slots
    codec = c.model.codec if c.model else None
    if c.model is not None:
        req["base_arch"] = c.model.arch
    run_dir = settings.runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.toml"
    write_config(trainer_config(req, codec), config)
    resume = bool(req.get("resume")) or (
        attempt > 1 and (run_dir / "checkpoints" / "manifest.json").is_file()
    )
    watch = NodeWatch(job_id, attempt, worker) if int(req.get("nodes", 1)) > 1 else None
    try:
        rdzv = watch.rendezvous(resume) if watch else None
        cmd = command(config, run_dir, max(1, len(slots)), resume, rdzv)
        env = trainer_env(slots, dict(os.environ))
    except (RuntimeError, NodeFailure) as exc:
        err = exc.error if isinstance(exc, NodeFailure) else {"code": "gpus_not_visible", "message": str(exc)}
        with session_scope() as session:
            leases.release(session, job_id)
            jobs.finish(session, job_id, "failed", error=err, attempt=attempt)
        return "failed"
    log.info("job %s: %s", job_id, shlex.join(cmd))
    sup = _Supervisor(job_id, run_dir)
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if watch:
        watch.announce()
    tree: dict[int, int] = {}  # every trainer process ever seen (ranks run in sessions of their own)
    failure: dict[str, Any] | None = None
    node_failure: NodeFailure | None = None
    rc, cancelled, preempted = None, False, False
    try:
        with session_scope() as session:
            sup.load_stored(session)
            sup.registered = {
                c.name.removeprefix(f"{job_id}-")
                for table in (Checkpoint, Adapter)
                for c in session.query(table).filter_by(train_job_id=job_id)
            }
        rc, cancelled, preempted = _supervise(sup, cmd, env, tree, watch)
        if watch and rc != 0 and not (cancelled or preempted):
            watch.settle()  # a lost node re-queues the job (NodeFailure)
    except NodeFailure as exc:
        node_failure = exc
    except Exception as exc:
        # A supervisor that cannot go on (database error, a bad metrics line) must not leave the trainer running
        # with its slots held: maintenance would re-queue the job and a second trainer would write into this run
        # folder (issue 10, item 3). The trainer is killed and the slots released first; then the job fails.
        log.exception("job %s: supervising the trainer failed", job_id)
        failure = {"code": "supervisor_error", "message": f"{type(exc).__name__}: {exc}"}
    finally:
        kill_tree(tree, signal.SIGKILL)
        try:
            with session_scope() as session:
                leases.release(session, job_id)
        except Exception:
            log.exception("job %s: releasing its slots failed (they go stale without heartbeats)", job_id)
    if node_failure is not None:
        return conclude(job_id, attempt, node_failure)
    if failure is not None:
        with session_scope() as session:
            jobs.finish(session, job_id, "failed", error=failure, attempt=attempt)
        return "failed"
    if preempted:
        (run_dir / PREEMPT).unlink(missing_ok=True)
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is not None:
                jobs.requeue(session, job, "worker_shutdown")
        return "preempted"
    outcome, error = "failed", None
    if cancelled:
        outcome = "cancelled"
    elif rc == 0:
        outcome = "succeeded"
        for final, is_adapter in (
            (run_dir / "final.safetensors", False),
            (run_dir / "final_adapter.safetensors", True),
        ):
            if final.is_file():
                with session_scope() as session, contextlib.suppress(registry.Deleted):
                    sup.register(session, final, "final", sup.latest.get("step"), is_adapter)
    else:
        tail = (run_dir / "train.log").read_bytes()[-2000:].decode(errors="replace")
        error = {"code": "trainer_failed", "message": f"trainer exited with {rc}: {tail}"}
    with session_scope() as session:
        jobs.finish(
            session,
            job_id,
            outcome,
            error=error,
            result={
                "metrics": sup.latest,
                "run_dir": str(run_dir),
                "returncode": rc,
                **({"nodes": watch.record()} if watch else {}),
            },
            attempt=attempt,
        )
    return outcome


def _supervise(
    sup: _Supervisor, cmd: list[str], env: dict[str, str], tree: dict[int, int], watch: NodeWatch | None
) -> tuple[int | None, bool, bool]:
    """Run the trainer to its end; returns (returncode, cancelled, preempted). ``tree`` collects the trainer's
    processes as they appear, so the caller can kill them whatever happens here. ``watch`` (node 0 of a
    multi-node job) raises NodeFailure when a node does not join in time or is lost."""
    settings = get_settings()
    job_id, run_dir = sup.job_id, sup.run_dir
    lease_worker = watch.worker if watch else None
    with Heartbeat(job_id, lease_worker=lease_worker), (run_dir / "train.log").open("ab") as logf:
        proc = start_run(cmd, cwd=run_dir, log=logf, env=env)
        tree |= process_tree(proc.pid)
        cancelled_at: float | None = None
        preempted = False
        (run_dir / PREEMPT).unlink(missing_ok=True)
        while proc.poll() is None:
            time.sleep(0.5)
            tree |= process_tree(proc.pid)
            sup.poll()
            if watch and cancelled_at is None:  # stopping anyway: the other nodes stop with it
                watch.check()
            with session_scope() as session:
                want_cancel = jobs.cancel_requested(session, job_id)
            if not preempted and cancelled_at is None and (run_dir / PREEMPT).exists():
                preempted = True
                cancelled_at = time.monotonic()
                os.killpg(proc.pid, signal.SIGTERM)
            elif want_cancel and cancelled_at is None:
                cancelled_at = time.monotonic()
                os.killpg(proc.pid, signal.SIGTERM)
            elif cancelled_at is not None and time.monotonic() - cancelled_at > settings.train_kill_grace_s:
                kill_tree(tree | process_tree(proc.pid), signal.SIGKILL)
        # Ranks that outlive torchrun (e.g. stuck in a collective, or ignoring SIGTERM) must not keep the GPU.
        deadline = time.monotonic() + (settings.train_kill_grace_s if cancelled_at is not None else 5.0)
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_tree(tree, signal.SIGKILL)
        sup.poll()
    return proc.returncode, cancelled_at is not None and not preempted, preempted
