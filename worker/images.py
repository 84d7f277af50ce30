"""Run one image job by id (claimed through worker/claim.py), with the queued jobs that share its batch: sample,
write the files, record them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from app.db import session_scope
from app.models import Image
from app.services import edits, jobs, leases
from app.settings import get_settings
from hdm_core import imagefile
from worker import batcher, metrics, model_cache
from worker.claim import Claimed, claim
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)


def run_image_job(job_id: str, *, worker: str, slot: int | None) -> str:
    """Returns what happened to ``job_id`` (for logs/tests): skipped | bounced | succeeded | failed | cancelled.
    Queued jobs that run in its network forward join it (worker/batcher.py), each finished on its own."""
    c = claim(job_id, worker, slot=slot)
    if isinstance(c, str):
        return c
    try:
        with Heartbeat(c.job_id) as beat:
            group, outcomes = _run(c, worker, slot, beat)
    finally:
        with session_scope() as session:
            leases.release(session, job_id)
    for g, (outcome, error, result) in zip(group, outcomes, strict=True):
        if outcome == "cancelled":  # finished when the cancel was seen (batch callback, or before its files)
            continue
        with session_scope() as session:
            if not jobs.finish(session, g.job_id, outcome, error=error, result=result, attempt=g.attempt):
                log.warning(
                    "job %s: finishing as %s was refused (requeued or finished elsewhere)", g.job_id, outcome
                )
        log.info("job %s %s in %.2fs", g.job_id, outcome, sum(v or 0 for v in result["timings"].values()))
    _observe(group, outcomes)
    return outcomes[0][0]


def _run(
    head: Claimed, worker: str, slot: int | None, beat: Heartbeat
) -> tuple[list[Claimed], list[Outcome]]:
    """Check and load what the delivered job needs, then claim the jobs of its forward and sample them all. A job
    that cannot run fails before any companion joins it, so it fails alone."""
    result: dict[str, Any] = {"timings": {}, "cache_hit": None, "batch": {"id": "", "size": 1}}
    try:
        why = batcher.invalid(head.request)
        if why is not None:
            raise ValueError(why)
        pipe = _load(head, result)
    except Exception as exc:
        return [head], [_failed(head.job_id, exc, result)]
    group = [head, *batcher.claim_companions(head, worker, batcher.Forward.of(pipe), slot)]
    beat.add([g.job_id for g in group[1:]])
    return group, _generate(pipe, group, result)


def _observe(group: list[Claimed], outcomes: list[Outcome]) -> None:
    """worker/metrics.py: the batch's throughput, its model-cache use and each job's run time."""
    try:
        result = outcomes[0][2]
        m = metrics.metrics()
        if result.get("cache_hit") is not None:
            images = sum(g.request["n"] for g in group)
            m.image_batch(
                len(group), images, result["timings"].get("sample_s", 0.0), bool(result["cache_hit"])
            )
        m.jobs_ended(g.job_id for g in group)
    except Exception:  # a metric must never fail a job that has its images
        log.exception("image metrics")


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


Outcome = tuple[str, dict[str, Any] | None, dict[str, Any]]  # status, error, result (timings, cache hit, ...)


def _load(head: Claimed, result: dict[str, Any]) -> Any:
    """The job's pipeline (worker/model_cache.py) with its adapters merged; load_s, cache_hit, dtype in ``result``."""
    from hdm_core.precision import dtype_name

    settings = get_settings()
    if head.model is None:
        raise ValueError("the job's model is no longer registered")
    # a checkpoint without its own VAE (and not pixel-space) decodes with the server's HDM_VAE
    vae = settings.vae if head.model.codec not in ("vae", "pixel") else None
    t0 = time.perf_counter()
    pipe, loaded_now = model_cache.get_pipeline(
        head.model.path,
        settings.text_encoder,
        settings.device,
        vae=vae,
        dtype=settings.dtype,
        compile_mode=settings.compile,
    )
    result.update(cache_hit=not loaded_now, dtype=dtype_name(pipe.dtype))
    gone = [a.name for a in head.adapters if a.path is None]
    if gone:
        raise ValueError(f"adapter(s) {gone} are no longer registered")
    model_cache.use_adapters(pipe, [(str(a.path), a.name, a.sha256, a.weight) for a in head.adapters])
    result["timings"]["load_s"] = round(time.perf_counter() - t0, 4)
    return pipe


def _generate(pipe: Any, group: list[Claimed], shared: dict[str, Any]) -> list[Outcome]:
    """Sample the jobs of ``group`` (one job, or a batch of one network forward: batcher.batch_key) as one
    generate_batch call, then write each job's files. If the batch fails, each of its jobs samples alone, so one
    job's failure is its own."""
    from hdm_core.batching import ImageJob
    from hdm_core.pipeline import Camera, TreadGuidance

    req = group[0].request
    batch = {"id": batcher.new_batch_id(), "size": len(group)}
    result: dict[str, Any] = {**shared, "timings": dict(shared["timings"]), "batch": batch}
    try:
        images = sum(g.request["n"] for g in group)  # one prompt per job
        compile_s = model_cache.warm_up(pipe, req["width"], req["height"], images, req["guidance_scale"])
        if compile_s:
            result["timings"]["compile_s"] = round(compile_s, 4)
        _log_batch(group, batch, result["dtype"])
        specs = [
            ImageJob(
                g.request["prompt"],
                seed=g.request["seed"],
                negative_prompt=g.request.get("negative_prompt", ""),
                n=g.request["n"],
                edit=_edit_spec(g.request),
            )
            for g in group
        ]
        progress = batcher.BatchProgress(group, result)
        t1 = time.perf_counter()
        generated = pipe.generate_batch(
            specs,
            width=req["width"],
            height=req["height"],
            steps=req["steps"],
            guidance_scale=req["guidance_scale"],
            sampler=req["sampler"],
            shift=req.get("shift", 1.0),
            schedule=req.get("schedule"),
            camera=Camera(**req["camera"]),
            tread=TreadGuidance(**req["tread_guidance"]),
            callback=progress,
        )
        result["timings"]["sample_s"] = round(time.perf_counter() - t1, 4)
    except Exception as exc:
        if len(group) == 1:
            return [_failed(group[0].job_id, exc, result)]
        log.warning(
            "%s failed (%s: %s); each of its jobs samples alone", batch["id"], type(exc).__name__, exc
        )
        return [out for g in group for out in _generate(pipe, [g], shared)]
    return [
        ("cancelled", None, result)
        if res is None or j in progress.cancelled or _cancelled_before_save(g, result)
        else _save(g, res, result)
        for j, (g, res) in enumerate(zip(group, generated, strict=True))
    ]


def _cancelled_before_save(c: Claimed, result: dict[str, Any]) -> bool:
    """A cancel that came after the job's rows finished: it ends cancelled, without files, and its companions go on."""
    with session_scope() as session:
        if not jobs.cancel_requested(session, c.job_id):
            return False
        jobs.finish(session, c.job_id, "cancelled", result=result, attempt=c.attempt)
    log.info("job %s cancelled after sampling; its files are not written", c.job_id)
    return True


def _log_batch(group: list[Claimed], batch: dict[str, Any], dtype: str) -> None:
    ids = [g.job_id for g in group]
    if len(group) > 1:
        log.info("%s: %d jobs in one batch: %s", batch["id"], len(group), ", ".join(ids))
    with session_scope() as session:
        for job_id in ids:
            message = f"sampling in {dtype}" + (
                f", {batch['id']} of {len(group)} jobs" if len(group) > 1 else ""
            )
            jobs.add_event(
                session,
                job_id,
                "log",
                {"message": message, "dtype": dtype, "batch_id": batch["id"], "batch_size": len(group)},
            )
        session.commit()


def _failed(job_id: str, exc: Exception, shared: dict[str, Any]) -> Outcome:
    result = {**shared, "timings": dict(shared["timings"])}
    if isinstance(exc, ValueError):
        log.warning("job %s: %s", job_id, exc)
        return "failed", {"code": "invalid_request", "message": str(exc)}, result
    log.error("job %s failed", job_id, exc_info=exc)
    return "failed", {"code": "generation_error", "message": f"{type(exc).__name__}: {exc}"}, result


def _save(c: Claimed, generated: Any, shared: dict[str, Any]) -> Outcome:
    """Write one job's files and image rows; its own decode_s."""
    result = {**shared, "timings": dict(shared["timings"])}
    req, model, adapters = c.request, c.model, c.adapters
    assert model is not None  # checked before sampling
    try:
        t2 = time.perf_counter()
        fmt = req.get("output_format", "png")
        out_dir = get_settings().outputs_dir / c.job_id
        rows = []
        for i, (img, seed) in enumerate(zip(generated.images, generated.seeds, strict=True)):
            file = out_dir / f"{i}.{imagefile.EXT[fmt]}"
            imagefile.save(
                img,
                file,
                fmt,
                imagefile.parameters_text(
                    req,
                    seed=seed,
                    model_name=model.name,
                    model_hash=model.sha256,
                    adapters=[(a.name, a.weight, a.sha256) for a in adapters],
                    extra=(
                        *(generated.edit.parameters_fields() if generated.edit else ()),
                        *imagefile.schedule_fields(req.get("schedule"), generated.times),
                        f"Dtype: {shared.get('dtype')}",
                    ),
                ),
            )
            rows.append(
                Image(
                    job_id=c.job_id,
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
                session.execute(delete(Image).where(Image.job_id == c.job_id, Image.index == row.index))
                session.add(row)
        result["timings"]["decode_s"] = round(time.perf_counter() - t2, 4)
        return "succeeded", None, result
    except Exception as exc:
        return _failed(c.job_id, exc, result)
