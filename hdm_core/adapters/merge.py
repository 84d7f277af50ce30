"""A checkpoint file with adapters merged into its weights: the base model's file, its codec and training metadata
kept, the merged XUT weights written by `save_checkpoint`. Used by `hdm adapters merge` and the service's merge jobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import load_checkpoint, save_checkpoint
from .apply import merge_adapters
from .files import file_sha256, load_adapter

# Keys `save_checkpoint` writes itself; every other metadata key of the base (e.g. the trained caption length) is kept.
_OWN_KEYS = ("format", "hdm_config", "hdm_codec", "vae_config")


def merge_checkpoint(base: str | Path, adapters: Sequence[tuple[str | Path, float]], out: str | Path) -> Path:
    """Write `base` + sum_i weight_i * adapter_i to `out` (atomically). The adapters are checked against the base's
    architecture first (AdapterError names the one that does not fit); the metadata lists what was merged."""
    loaded = load_checkpoint(base)
    files = [(load_adapter(path), float(weight)) for path, weight in adapters]
    merged = merge_adapters(loaded.model, files)
    meta = {k: v for k, v in loaded.metadata.items() if k not in _OWN_KEYS}
    meta["hdm_merged_adapters"] = json.dumps(
        [
            {"name": a.name, "sha256": file_sha256(path), "weight": w}
            for (a, w), (path, _) in zip(files, adapters, strict=True)
        ]
    )
    return save_checkpoint(out, merged, codec=loaded.codec, metadata=meta)
