"""One loaded pipeline per worker process; asking for another checkpoint evicts the old one first.

Adapters are merged into the cached model's weights in place (hdm_core.adapters.apply.apply_adapters), never by reloading
it. The last applied set stays merged while the next request asks for the same adapters and weights; a request for a
different set (or none) first puts the base weights back bit-exactly (AppliedAdapters.restore), so a request without
adapters always samples the base model as a fresh worker would. Adapter files are read through a small LRU cache."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ADAPTER_FILES_CACHED = 8  # adapter files held in memory (a LoKr adapter of the full model is tens of MB)

_lock = threading.Lock()
_current: tuple[tuple[str, ...], Any] | None = None
_warm: set[tuple[int, int, int]] = set()  # (width, height, images per batch) the compiled network has seen
# what is merged into _current's model now: ((sha256, weight), ...) and the handle that restores it
_applied: tuple[tuple[tuple[str, float], ...], Any] | None = None
_files: OrderedDict[tuple[str, str], Any] = OrderedDict()


def get_pipeline(
    checkpoint: str,
    text_encoder: Path | None,
    device: str,
    vae: Path | None = None,
    *,
    dtype: str = "auto",
    compile_mode: str = "off",
) -> tuple[Any, bool]:
    """Returns (pipeline, loaded_now). ``vae``: a diffusers folder for a checkpoint that carries no VAE.
    ``dtype``: HDM_DTYPE (hdm_core.precision.resolve_dtype); ``compile_mode``: HDM_COMPILE (see `warm_up`)."""
    global _current, _applied
    import torch

    from hdm_core.allocator import keep_freed_memory
    from hdm_core.pipeline import HDMPipeline

    if text_encoder is None:
        raise ValueError("no text encoder configured (HDM_TEXT_ENCODER)")
    key = (checkpoint, str(text_encoder), device, str(vae or ""), dtype, compile_mode)
    with _lock:
        if _current is not None and _current[0] == key:
            if _current[1].refresh_tuned_schedule():  # `hdm tune-schedule` wrote the model's knots since
                log.info("re-read the tuned schedule of %s", checkpoint)
            return _current[1], False
        if _current is not None:
            log.info("evicting %s", _current[0][0])
            _current, _applied = None, None
            _warm.clear()
            gc.collect()
            if torch.cuda.is_available() and device.startswith("cuda"):
                torch.cuda.empty_cache()
        log.info("loading %s on %s", checkpoint, device)
        keep_freed_memory()  # a sampling step re-allocates what the last one freed (hdm_core/allocator.py)
        pipe = HDMPipeline.from_paths(checkpoint, text_encoder, device=device, dtype=dtype, vae=vae)
        if compile_mode != "off":
            pipe.compile(compile_mode)
        _current = (key, pipe)
        return pipe, True


def warm_up(pipe: Any, width: int, height: int, images: int, guidance_scale: float) -> float:
    """Compile the cached pipeline's network for this shape before a job samples with it (the first call of a new
    shape compiles: tens of seconds that would otherwise count as the job's sampling time). Returns the seconds
    spent; 0 for an eager pipeline or a shape seen before."""
    if pipe.net is pipe.model or (width, height, images) in _warm:
        return 0.0
    t0 = time.perf_counter()
    pipe.warm_up(width, height, images=images, guidance_scale=guidance_scale)
    _warm.add((width, height, images))
    log.info("compiled for %dx%d x%d in %.1fs", width, height, images, time.perf_counter() - t0)
    return time.perf_counter() - t0


def _adapter_file(path: str, sha256: str, name: str) -> Any:
    from hdm_core.adapters.files import load_adapter

    key = (path, sha256)
    if key in _files:
        _files.move_to_end(key)
        return _files[key]
    loaded = load_adapter(path, name=name)
    _files[key] = loaded
    while len(_files) > ADAPTER_FILES_CACHED:
        _files.popitem(last=False)
    return loaded


def use_adapters(pipe: Any, adapters: Sequence[tuple[str, str, str, float]]) -> bool:
    """Make ``pipe``'s model the base model plus ``adapters`` ((path, name, sha256, weight), ...; weight 0 = off).
    Returns whether the weights changed. On an error (AdapterError is a ValueError) the model is the base model."""
    global _applied
    from hdm_core.adapters.apply import apply_adapters

    wanted = tuple((sha, float(w)) for _, _, sha, w in adapters if w != 0)
    with _lock:
        if _current is None or _current[1] is not pipe:
            raise RuntimeError("use_adapters: the pipeline is not the cached one")
        state = _applied or ((), None)
        if state[0] == wanted:
            return False
        if state[1] is not None:
            state[1].restore()
            log.info("adapters removed: %s", state[1].adapters)
        _applied = None
        if not wanted:
            return True
        loaded = [(_adapter_file(p, sha, name), float(w)) for p, name, sha, w in adapters if w != 0]
        handle = apply_adapters(pipe.model, loaded)
        _applied = (wanted, handle)
        log.info("adapters applied: %s", handle.adapters)
        return True


def loaded() -> str | None:
    return _current[0][0] if _current else None
