"""Multi-node train jobs (``nodes`` > 1, docs/deployment.md): a job's slots form one part per node, each part on
one machine (a slot group of HDM_SLOT_GROUPS). ``Job.slots`` lists the parts in node order (``gpus`` slots each);
node 0's trainer claims the job and hosts the torchrun rendezvous, every further node gets a message on the train
queue of its part's first slot and joins the rendezvous. The leases say which worker took which part."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import queue
from app.models import GpuLease, Job
from app.settings import get_settings


def place(groups: list[list[int]], free: list[int], gpus: int, nodes: int) -> list[list[int]] | None:
    """The first ``nodes`` machines (slot groups) with ``gpus`` free slots each, ``gpus`` slots of each; None when
    fewer machines have that many free."""
    picked = []
    for group in groups:
        have = [s for s in free if s in group]
        if len(have) >= gpus:
            picked.append(have[:gpus])
            if len(picked) == nodes:
                return picked
    return None


def parts(job: Job) -> list[list[int]]:
    """The job's slots per node (node 0 first); one part for a single-node job."""
    slots = list(job.slots or [])
    gpus = max(1, int(job.request.get("gpus", 1)))
    return [slots[i : i + gpus] for i in range(0, len(slots), gpus)] or [[]]


def is_multinode(job: Job) -> bool:
    return int(job.request.get("nodes", 1)) > 1


def rendezvous_port(part: list[int]) -> int:
    """Node 0 hosts the c10d store on HDM_RDZV_PORT + its first slot: a slot is leased to one job at a time."""
    return get_settings().rdzv_port + part[0]


def publish_members(job: Job) -> None:
    """One message per further node, on the train queue of its part's first slot (that machine's trainer)."""
    settings = get_settings()
    for rank, part in enumerate(parts(job)[1:], start=1):
        queue.publish_node(job.id, rank, settings.train_queue(part[0]), job.enqueue_count)


def describe(part: list[int], rank: int) -> str:
    return f"node {rank} (slots {part}, queue {get_settings().train_queue(part[0])})"


def view(session: Session, job: Job) -> list[dict[str, Any]]:
    """Which nodes and slots the job holds, and the worker that took each part (from the leases while it runs,
    then from what node 0 recorded)."""
    held = {
        lease.slot: lease.worker
        for lease in session.scalars(select(GpuLease).where(GpuLease.job_id == job.id))
        if job.status in ("queued", "running")
    }
    recorded = {int(n["rank"]): n.get("worker") for n in (job.result or {}).get("nodes") or []}
    out = []
    for rank, part in enumerate(parts(job)):
        if not part:
            continue
        worker = next((held[s] for s in part if held.get(s)), None) or recorded.get(rank)
        out.append({"rank": rank, "slots": part, "worker": worker})
    return out
