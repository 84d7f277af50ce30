"""Run one image job by id (claimed through worker/claim.py): sample, write the files, record them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update

from app.db import session_scope, utcnow
from app.models import Image, Job
from app.services import edits, jobs, leases
from app.settings import get_settings
from hdm_core import imagefile
from worker import model_cache
from worker.claim import AdapterFile, claim
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)


class _Progress:
    """Sampler callback: records progress and stops the sampler when a cancel was requested."""

    def __init__(self, job_id: str, total: int) -> None:
        self.job_id, self.total = job_id, total
        self.last_write = 0.0

    def __call__(self, step: int, total: int) -> None:
        from hdm_core.sampler import SamplingCancelled

        with session_scope() as session:
            if jobs.cancel_requested(session, self.job_id):
                raise SamplingCancelled(f"job {self.job_id} cancelled at step {step}")
            now = time.monotonic()
            if step >= total or now - self.last_write >= 0.2:
                self.last_write = now
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id)
                    .values(progress_step=step, progress_total=total, heartbeat_at=utcnow())
                )
                jobs.add_event(session, self.job_id, "progress", {"step": step, "total": total})


def run_image_job(job_id: str, *, worker: str, slot: int | None) -> str:
    """Returns what happened (for logs/tests): skipped | bounced | succeeded | failed | cancelled."""
    c = claim(job_id, worker, slot=slot)
    if isinstance(c, str):
        return c
    attempt, req = c.attempt, c.request
    ckpt_info = (c.model.path, c.model.name, c.model.sha256, c.model.codec) if c.model else None
    try:
        with Heartbeat(job_id):
            outcome, error, timings = _generate(job_id, req, ckpt_info, c.adapters)
    finally:
        with session_scope() as session:
            leases.release(session, job_id)
    with session_scope() as session:
        cache_hit = timings.pop("cache_hit", None)
        result = {"timings": timings, "cache_hit": None if cache_hit is None else bool(cache_hit)}
        if not jobs.finish(session, job_id, outcome, error=error, result=result, attempt=attempt):
            log.warning(
                "job %s: finishing as %s was refused (requeued or finished elsewhere)", job_id, outcome
            )
    log.info("job %s %s in %.2fs", job_id, outcome, sum(v or 0 for v in timings.values()))
    return outcome


def _edit_spec(req: dict[str, Any]) -> Any:
    """The job's init image and mask (PNGs the API validated and wrote, app/services/edits.py) as an EditSpec."""
    if not req.get("init_image"):
        return None
    from PIL import Image as PILImage

    from hdm_core.edit import EditSpec

    def load(upload_id: str) -> PILImage.Image:
        try:
            with PILImage.open(edits.path(upload_id), formats=["PNG"]) as im:
                im.load()
                return im.copy()
        except OSError as exc:  # removed since the job was created: the job fails, the worker does not
            raise ValueError(f"upload {upload_id} is no longer available: {exc}") from None

    mask = req.get("mask")
    return EditSpec(
        image=load(req["init_image"]),
        strength=req["strength"],
        mask=load(mask) if mask else None,
        mask_blur=req.get("mask_blur", 0.0),
    )


def _generate(
    job_id: str,
    req: dict[str, Any],
    ckpt: tuple[str, str, str | None, str | None] | None,
    adapters: tuple[AdapterFile, ...] = (),
) -> tuple[str, dict[str, Any] | None, dict[str, float]]:
    from hdm_core.pipeline import Camera, TreadGuidance
    from hdm_core.sampler import SamplingCancelled

    settings = get_settings()
    timings: dict[str, float] = {}
    try:
        if ckpt is None:
            raise ValueError("the job's model is no longer registered")
        path, model_name, sha, codec = ckpt
        # a checkpoint without its own VAE (and not pixel-space) decodes with the server's HDM_VAE
        vae = settings.vae if codec not in ("vae", "pixel") else None
        t0 = time.perf_counter()
        pipe, loaded_now = model_cache.get_pipeline(path, settings.text_encoder, settings.device, vae=vae)
        timings["cache_hit"] = 0.0 if loaded_now else 1.0
        gone = [a.name for a in adapters if a.path is None]
        if gone:
            raise ValueError(f"adapter(s) {gone} are no longer registered")
        model_cache.use_adapters(pipe, [(str(a.path), a.name, a.sha256, a.weight) for a in adapters])
        timings["load_s"] = round(time.perf_counter() - t0, 4)
        t1 = time.perf_counter()
        result = pipe.generate(
            req["prompt"],
            negative_prompt=req.get("negative_prompt", ""),
            n=req["n"],
            width=req["width"],
            height=req["height"],
            steps=req["steps"],
            guidance_scale=req["guidance_scale"],
            seed=req["seed"],
            sampler=req["sampler"],
            camera=Camera(**req["camera"]),
            tread=TreadGuidance(**req["tread_guidance"]),
            callback=_Progress(job_id, req["steps"]),
            edit=_edit_spec(req),
        )
        timings["sample_s"] = round(time.perf_counter() - t1, 4)
        t2 = time.perf_counter()
        fmt = req.get("output_format", "png")
        out_dir = settings.outputs_dir / job_id
        rows = []
        for i, (img, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            file = out_dir / f"{i}.{imagefile.EXT[fmt]}"
            imagefile.save(
                img,
                file,
                fmt,
                imagefile.parameters_text(
                    req,
                    seed=seed,
                    model_name=model_name,
                    model_hash=sha,
                    adapters=[(a.name, a.weight, a.sha256) for a in adapters],
                    extra=result.edit.parameters_fields() if result.edit else (),
                ),
            )
            rows.append(
                Image(
                    job_id=job_id,
                    index=i,
                    seed=seed,
                    width=img.width,
                    height=img.height,
                    format=fmt,
                    path=str(Path(file).resolve()),
                )
            )
        with session_scope() as session:
            for row in rows:  # replace rows a killed earlier attempt may have left
                session.execute(delete(Image).where(Image.job_id == job_id, Image.index == row.index))
                session.add(row)
        timings["decode_s"] = round(time.perf_counter() - t2, 4)
        return "succeeded", None, timings
    except SamplingCancelled:
        return "cancelled", None, timings
    except ValueError as exc:
        log.warning("job %s: %s", job_id, exc)
        return "failed", {"code": "invalid_request", "message": str(exc)}, timings
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return "failed", {"code": "generation_error", "message": f"{type(exc).__name__}: {exc}"}, timings
