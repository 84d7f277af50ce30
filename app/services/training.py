"""Train jobs: validate, queue, schedule onto free GPU slots (leases), resume, render."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Checkpoint, Dataset, Job
from app.schemas import TrainRequest
from app.services import jobs, leases, models, nodes, storage, webhooks
from app.settings import get_settings
from hdm_core.config import PRESETS, XUTConfig, is_pixel_space, param_count
from hdm_core.train.config import ADAPTER_RECIPE_LR

log = logging.getLogger(__name__)
SAMPLE_MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
SAMPLE_EXTS = tuple(SAMPLE_MEDIA)


def create(
    session: Session, req: TrainRequest, *, owner: str, idempotency_key: str | None
) -> tuple[Job, bool]:
    settings = get_settings()
    webhooks.check_url(req.webhook)
    raw = req.model_dump(mode="json", exclude_unset=True)
    existing = jobs.find_idempotent(session, owner, idempotency_key, jobs.request_hash(raw))
    if existing is not None:
        return existing, False
    storage.check_quota(session, owner)
    ds = session.get(Dataset, req.dataset)
    if ds is None or ds.owner != owner:
        raise Invalid(f"Unknown dataset {req.dataset!r}; create it with POST /v1/datasets.", param="dataset")
    if ds.status == "invalid":
        raise Invalid(
            f"Dataset {ds.id} failed validation: {(ds.error or {}).get('message')}", param="dataset"
        )
    base = (
        models.resolve(session, req.base_model, owner=owner, param="base_model") if req.base_model else None
    )
    if req.adapter is not None and base is None:
        raise Invalid("An adapter is trained on a base model: give base_model.", param="base_model")
    if isinstance(req.arch, str) and req.arch not in PRESETS:
        raise Invalid(
            f"Unknown preset {req.arch!r}; one of {list(PRESETS)} or an architecture object.", param="arch"
        )
    if isinstance(req.arch, dict):
        check_arch(req.arch, settings.max_arch_params)
    first = req.stages[0].grad_checkpointing
    for i, stage in enumerate(
        req.stages
    ):  # the trainer has one model-wide switch ([model] gradient_checkpointing)
        if stage.grad_checkpointing != first:
            raise Invalid(
                "grad_checkpointing applies to the whole run: give every stage the same value.",
                param=f"stages.{i}.grad_checkpointing",
            )
    if not pixel_space(req.arch, base) and not carries_vae(base) and settings.vae is None:
        what = (
            f"Base model {base.name!r} carries no VAE"
            if base
            else f"Architecture {req.arch if isinstance(req.arch, str) else 'object'!r} is a latent (non-pixel) model"
        )
        raise Invalid(
            f"{what} and the server has no VAE configured: set HDM_VAE to a diffusers AutoencoderKL folder "
            "on the workers, fine-tune a checkpoint that carries its VAE, or train a pixel-space "
            "architecture (in_channels 3, e.g. xut-pixel-debug).",
            param="base_model" if base else "arch",
            code="vae_required",
        )
    check_layout(req.gpus, req.nodes)
    request = req.model_dump(mode="json")
    request["dataset_path"] = ds.path
    request["base_model_path"] = base.path if base else None
    request["base_model_name"] = base.name if base else None
    if (
        req.adapter is not None
    ):  # HDM's recipe lr where the caller gave none (the trainer's default, one value)
        given = raw.get("stages") or []
        for i, stage in enumerate(request["stages"]):
            if "lr" not in (given[i] if i < len(given) else {}):
                stage["lr"] = ADAPTER_RECIPE_LR
    job, created = jobs.create_job(
        session,
        kind="train",
        owner=owner,
        idempotency_key=idempotency_key,
        raw_body=raw,
        request=request,
        queue_name=None,
        model_id=base.id if base else None,
        dataset_id=ds.id,
        webhook=req.webhook,
        publish=False,
    )
    if created:
        job.progress_total = sum(s.steps or 0 for s in req.stages)
        session.commit()
    return job, created


# Per-field bounds of architecture objects (well above every preset): a typo like dim 10^6 is a 422 now, not a
# trainer that exhausts the host's memory building blocks. The parameter count bounds their product.
ARCH_LIMITS = {
    "patch_size": 16,
    "in_channels": 64,
    "dim": 16384,
    "ctx_dim": 16384,
    "ctx_size": 4096,
    "heads": 256,
    "head_dim": 512,
    "mlp_dim": 65536,
    "depth": 64,
    "enc_blocks": 64,
    "dec_blocks": 64,
    "tread_pre": 64,
    "tread_post": 64,
    "addon_dim": 64,
}


def check_layout(gpus: int, nodes: int) -> None:
    """``gpus`` per machine on ``nodes`` machines (slot groups, HDM_SLOT_GROUPS) must exist on this server."""
    settings = get_settings()
    groups = settings.slot_group_list
    if gpus * nodes > len(settings.slot_list):
        raise Invalid(
            f"This server has {len(settings.slot_list)} GPU slot(s); asked for {gpus} x {nodes} node(s).",
            param="gpus" if nodes == 1 else "nodes",
        )
    if nodes > len(groups):
        raise Invalid(
            f"This server has {len(groups)} machine(s) (HDM_SLOT_GROUPS); asked for {nodes} nodes.",
            param="nodes",
        )
    fits = sorted((len(g) for g in groups), reverse=True)[nodes - 1]
    if gpus > fits:
        where = "One machine" if nodes == 1 else f"Only {sum(len(g) >= gpus for g in groups)} machine(s)"
        raise Invalid(
            f"{where} of this server has at most {fits} GPU slot(s) for {nodes} node(s); asked for {gpus} per "
            "node.",
            param="gpus",
        )
    if nodes > 1 and settings.embedded:
        raise Invalid(
            "Multi-node train jobs need the Celery broker (HDM_BROKER_URL redis://...); embedded mode runs on one "
            "machine.",
            param="nodes",
            code="unsupported",
        )


def check_arch(arch: dict[str, Any], max_params: int) -> XUTConfig:
    """The trainer's own validation (XUTConfig), per-field limits and a parameter budget; errors name
    ``arch.<field>``."""
    for key, value in arch.items():
        limit = ARCH_LIMITS.get(key)
        if limit is not None and isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise Invalid(f"arch.{key} must be at most {limit}, got {value}.", param=f"arch.{key}")
    try:
        cfg = XUTConfig.from_dict(arch)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        m = re.search(r"XUTConfig\.(\w+)|unknown field\(s\) \['(\w+)'", text)
        field = (m.group(1) or m.group(2)) if m else ("heads" if "heads * head_dim" in text else None)
        raise Invalid(
            f"Invalid architecture object: {text}", param=f"arch.{field}" if field else "arch"
        ) from None
    n = param_count(cfg)
    if n > max_params:
        raise Invalid(
            f"The architecture has {n:,} parameters; this server accepts at most {max_params:,} "
            "(HDM_MAX_ARCH_PARAMS).",
            param="arch",
            code="arch_too_large",
        )
    return cfg


def pixel_space(arch: str | dict[str, Any] | None, base: Checkpoint | None) -> bool:
    """Pixel-space model (no VAE needed): a base checkpoint saved with the pixel codec, or a pixel preset / an
    architecture object with 3 input channels."""
    if base is not None:
        return base.codec == "pixel" or (base.arch or {}).get("in_channels") == 3
    return is_pixel_space(arch)


def carries_vae(base: Checkpoint | None) -> bool:
    return base is not None and base.codec == "vae"


def schedule(session: Session) -> int:
    """Give queued train jobs free slots (oldest first), then publish them to their first slot's queue."""
    settings = get_settings()
    # keep reservations of scheduled-but-not-started jobs alive
    waiting = [
        j.id
        for j in session.scalars(
            select(Job).where(Job.kind == "train", Job.status == "queued", Job.slots.is_not(None))
        )
    ]
    if waiting:
        leases.beat(session, waiting)
    pending = list(
        session.scalars(
            select(Job)
            .where(Job.kind == "train", Job.status == "queued", Job.slots.is_(None))
            .order_by(Job.id)
        )
    )
    n = 0
    for job in pending:
        need, n_nodes = int(job.request.get("gpus", 1)), int(job.request.get("nodes", 1))
        free_all = leases.free_slots(session, settings.slot_list)
        # torchrun --standalone is one machine; a multi-node job gets one part per machine (app/services/nodes.py)
        placed = nodes.place(settings.slot_group_list, free_all, need, n_nodes)
        if placed is None:
            break  # FIFO: do not let smaller jobs overtake
        want = [slot for part in placed for slot in part]
        got = [slot for slot in want if leases.reserve(session, slot, job.id)]
        if len(got) < len(want):
            leases.release(session, job.id)
            break
        res = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", Job.slots.is_(None))
            .values(slots=got, queue=settings.train_queue(got[0]))
        )
        session.commit()
        if res.rowcount != 1:  # type: ignore[attr-defined]
            leases.release(session, job.id)
            continue
        session.refresh(job)
        where = "; ".join(f"node {r}: {p}" for r, p in enumerate(placed)) if n_nodes > 1 else f"{got}"
        jobs.add_event(session, job.id, "log", {"message": f"scheduled on slot(s) {where}"})
        jobs.enqueue(session, job)
        if n_nodes > 1:
            nodes.publish_members(job)
        n += 1
    return n


def resume(session: Session, job: Job) -> Job:
    """Back to the queue with ``--resume``. ``attempts`` is kept: it counts every start of the job, is the token
    that lets only the current attempt finish it (jobs.finish), and the HDM_MAX_ATTEMPTS limit on automatic
    retries after a lost worker stays spent. A resumed job whose attempts already reach the limit runs once more
    and is not retried again if its worker dies."""
    if job.status not in ("failed", "cancelled"):
        raise Conflict(
            f"Only failed or cancelled train jobs can be resumed; {job.id} is {job.status}.",
            code="not_resumable",
        )
    request = {**job.request, "resume": True}
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status)
        .values(
            status="queued",
            slots=None,
            queue=None,
            cancel_requested_at=None,
            finished_at=None,
            error=None,
            request=request,
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict("The job changed meanwhile; retry.", code="conflict")
    jobs.add_event(session, job.id, "status", {"status": "queued", "reason": "resume"})
    session.commit()
    session.refresh(job)
    return job


def sample_files(job_id: str) -> list[str]:
    """The sample images a run wrote so far, relative to its samples folder."""
    folder = get_settings().runs_dir / job_id / "samples"
    if not folder.is_dir():
        return []
    return [str(p.relative_to(folder)) for p in sorted(folder.glob("**/*")) if p.suffix in SAMPLE_EXTS]


def sample_path(job_id: str, name: str) -> Path:
    """A listed sample file of the run (never a path outside its samples folder)."""
    folder = (get_settings().runs_dir / job_id / "samples").resolve()
    try:
        path = (folder / name).resolve()
        ok = path.is_relative_to(folder) and path.suffix in SAMPLE_MEDIA and path.is_file()
    except (OSError, RuntimeError):
        ok = False
    if not ok:
        raise NotFound(f"Train job {job_id} has no sample {name!r}.", param="name")
    return path
