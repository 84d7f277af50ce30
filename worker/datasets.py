"""Dataset validation job: scan the folder, record counts and problems on the dataset row."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.db import session_scope, utcnow
from app.models import Dataset
from app.services import jobs
from worker.claim import claim

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def run_dataset_job(job_id: str, *, worker: str) -> str:
    c = claim(job_id, worker)
    if isinstance(c, str):
        return c
    attempt, ds_id = c.attempt, c.dataset_id
    folder = Path(c.dataset_path) if c.dataset_path else None
    stats, error = None, None
    try:
        if folder is None:
            raise ValueError("dataset row is gone")
        stats = scan(folder)
        if stats["images"] == 0:
            error = {"code": "empty_dataset", "message": f"no images found in {folder}"}
    except Exception as exc:
        error = {"code": "validation_error", "message": f"{type(exc).__name__}: {exc}"}
    with session_scope() as session:
        ds = session.get(Dataset, ds_id)
        if ds is not None:
            ds.stats, ds.error, ds.updated_at = stats, error, utcnow()
            ds.status = "invalid" if error else "ready"
        session.commit()
        outcome = "failed" if error else "succeeded"
        jobs.finish(session, job_id, outcome, error=error, result={"stats": stats}, attempt=attempt)
    return outcome


def scan(folder: Path, max_pixels: int = 64_000_000) -> dict[str, Any]:
    """Counts, unreadable/oversized images, missing captions, size histogram (runs in the worker)."""
    from PIL import Image as PILImage

    stats: dict[str, Any] = {
        "images": 0,
        "captioned": 0,
        "missing_captions": [],
        "unreadable": [],
        "oversized": [],
        "size_histogram": {},
    }
    hist: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            continue
        stats["images"] += 1
        rel = str(path.relative_to(folder))
        if path.with_suffix(".txt").is_file():
            stats["captioned"] += 1
        elif len(stats["missing_captions"]) < 100:
            stats["missing_captions"].append(rel)
        try:
            with PILImage.open(path) as im:
                w, h = im.size
                im.verify()
        except Exception:
            stats["unreadable"].append(rel)
            continue
        if w * h > max_pixels:
            stats["oversized"].append(rel)
        bucket = f"{(max(w, h) // 256) * 256}+"
        hist[bucket] = hist.get(bucket, 0) + 1
    stats["size_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0][:-1])))
    return stats
