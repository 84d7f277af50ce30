"""The API's views of its rows: image and train jobs, datasets, models, events. The one place a row becomes JSON,
so the services that create jobs and the webhook sender share it without importing each other."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import as_utc
from app.models import Adapter, Checkpoint, Dataset, Image, Job, JobEvent
from app.services import nodes, registry
from hdm_core.config import SAMPLER_NAMES, SCHEDULE_NAMES

SAMPLERS = list(SAMPLER_NAMES)
SCHEDULES = list(SCHEDULE_NAMES)


def iso(value: datetime | None) -> str | None:
    v = as_utc(value)
    return v.isoformat().replace("+00:00", "Z") if v else None


def queue_position(session: Session, job: Job) -> int | None:
    if job.status != "queued":
        return None
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.kind == job.kind, Job.status == "queued", Job.id < job.id)
        )
        or 0
    )


def job_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    return list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.train_job_id == job_id)
            .order_by(Checkpoint.step, Checkpoint.id)
        )
    )


def image_job(session: Session, job: Job, base_url: str = "") -> dict[str, Any]:
    images = list(session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index)))
    model = session.get(Checkpoint, job.model_id) if job.model_id else None
    result = job.result or {}
    timings = dict(result.get("timings") or {})
    started, created = job.started_at, job.created_at
    if started is not None and created is not None:
        timings.setdefault("queued_s", round((as_utc(started) - as_utc(created)).total_seconds(), 4))  # type: ignore[operator]
    for k in ("queued_s", "load_s", "sample_s", "decode_s"):
        timings.setdefault(k, None)
    base = base_url.rstrip("/")
    return {
        "id": job.id,
        "object": "image_job",
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "queue_position": queue_position(session, job),
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "request": job.request,
        "model": {"id": job.model_id, "name": model.name if model else None},
        "adapters": [
            {"id": a["id"], "name": a["name"], "weight": a["weight"]}
            for a in job.request.get("adapters") or []
        ],
        "images": [
            {
                "index": im.index,
                "seed": im.seed,
                "width": im.width,
                "height": im.height,
                "url": f"{base}/v1/images/{job.id}/files/{im.index}",
            }
            for im in images
        ],
        "error": job.error,
        "timings": timings,
        "attempts": job.attempts,
        "model_cache_hit": result.get("cache_hit"),
    }


def train_job(session: Session, job: Job) -> dict[str, Any]:
    result = job.result or {}
    m = result.get("metrics") or {}
    return {
        "id": job.id,
        "object": "train_job",
        "name": job.request.get("name", ""),
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "request": job.request,
        "base_model": job.model_id,
        "dataset": job.dataset_id,
        "stage": m.get("stage"),
        "step": job.progress_step,
        "total_steps": job.progress_total or None,
        "epoch": m.get("epoch"),
        "metrics": {
            "loss": m.get("loss"),
            "lr": m.get("lr"),
            "images_per_s": m.get("images_per_s"),
            "eta_s": m.get("eta_s"),
        },
        "gpus": job.slots or [],
        "nodes": nodes.view(session, job),  # rank, slots and the worker of each machine's part
        "checkpoints": [c.id for c in job_checkpoints(session, job.id)],
        "adapters": list(
            session.scalars(select(Adapter.id).where(Adapter.train_job_id == job.id).order_by(Adapter.id))
        ),
        "error": job.error,
        "attempts": job.attempts,
    }


def merge_job(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "merge_job",
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "request": job.request,
        "base_model": job.model_id,
        "model": (job.result or {}).get("model"),
        "error": job.error,
    }


def job_body(session: Session, job: Job) -> dict[str, Any]:
    """The body a webhook carries: the job as its GET endpoint shows it."""
    if job.kind == "image":
        return image_job(session, job)
    if job.kind == "train":
        return train_job(session, job)
    if job.kind == "merge":
        return merge_job(job)
    return {"id": job.id, "object": f"{job.kind}_job", "status": job.status, "error": job.error}


def dataset(ds: Dataset, admin: bool = False) -> dict[str, Any]:
    return {
        "id": ds.id,
        "object": "dataset",
        "name": ds.name,
        "path": registry.shown_path(ds.path, admin),
        "status": ds.status,
        "stats": ds.stats,
        "error": ds.error,
        "created_at": iso(ds.created_at),
        "updated_at": iso(ds.updated_at),
    }


def model(ckpt: Checkpoint, default_id: str | None = None, admin: bool = False) -> dict[str, Any]:
    """``admin``: the caller is an admin key (the only one shown the server's absolute path)."""
    return {
        "id": ckpt.id,
        "object": "model",
        "name": ckpt.name,
        "arch": ckpt.arch,
        "codec": ckpt.codec,
        "params": ckpt.params,
        "source": ckpt.source,
        "train_job": ckpt.train_job_id,
        "step": ckpt.step,
        "sha256": ckpt.sha256,
        "path": registry.shown_path(ckpt.path, admin),
        "size_bytes": ckpt.size_bytes,
        "created_at": iso(ckpt.created_at),
        "samplers": SAMPLERS,
        "schedules": SCHEDULES,
        "shared": ckpt.owner is None,
        "default": ckpt.id == default_id,
    }


def adapter(row: Adapter, admin: bool = False) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "adapter",
        "name": row.name,
        "algorithm": row.algorithm,
        "config": row.config,
        "base_model": {"name": row.base_model, "sha256": row.base_sha256, "arch": row.base_arch},
        "trigger_words": row.trigger_words,
        "caption_sample": row.caption_sample,
        "steps": row.steps,
        "params": row.params,
        "source": row.source,
        "train_job": row.train_job_id,
        "sha256": row.sha256,
        "path": registry.shown_path(row.path, admin),
        "size_bytes": row.size_bytes,
        "created_at": iso(row.created_at),
    }


def event(ev: JobEvent) -> dict[str, Any]:
    return {"id": ev.id, "type": ev.type, "data": ev.data, "created_at": iso(ev.created_at)}


def page(rows: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": rows, "has_more": has_more}
