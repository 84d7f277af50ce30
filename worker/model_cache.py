"""One loaded pipeline per worker process; asking for another checkpoint evicts the old one first."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_lock = threading.Lock()
_current: tuple[tuple[str, str, str, str], Any] | None = None


def get_pipeline(
    checkpoint: str, text_encoder: Path | None, device: str, vae: Path | None = None
) -> tuple[Any, bool]:
    """Returns (pipeline, loaded_now). ``vae``: a diffusers folder for a checkpoint that carries no VAE."""
    global _current
    import torch

    from hdm_core.pipeline import HDMPipeline

    if text_encoder is None:
        raise ValueError("no text encoder configured (HDM_TEXT_ENCODER)")
    key = (checkpoint, str(text_encoder), device, str(vae or ""))
    with _lock:
        if _current is not None and _current[0] == key:
            return _current[1], False
        if _current is not None:
            log.info("evicting %s", _current[0][0])
            _current = None
            gc.collect()
            if torch.cuda.is_available() and device.startswith("cuda"):
                torch.cuda.empty_cache()
        log.info("loading %s on %s", checkpoint, device)
        pipe = HDMPipeline.from_paths(checkpoint, text_encoder, device=device, dtype=torch.float32, vae=vae)
        _current = (key, pipe)
        return pipe, True


def loaded() -> str | None:
    return _current[0][0] if _current else None
