"""An adapter file made elsewhere (or here) turned into this service's format, without torch: keys mapped onto XUT
(`keys`), shapes checked against the base model, the buffer copied through (`container`), metadata written as
`files.save_adapter` writes it (`hdm_adapter_source` says where it came from; the tensors are the file's own)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import container, keys

FORMAT = "hdm-serve-adapter/1"  # files.FORMAT (that module imports torch)
_KOHYA_FOLDER = re.compile(r"^\d+_(?P<word>.+)$")


@dataclass(frozen=True)
class Base:
    """The model an upload is checked against: its name, file hash, XUTConfig dict and weight shapes by path."""

    name: str
    sha256: str
    arch: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_checkpoint(cls, name: str, sha256: str, arch: dict[str, Any], path: Path) -> Base:
        return cls(name, sha256, arch, container.model_weight_shapes(container.read(path)))


def trigger_words(meta: dict[str, str]) -> list[str]:
    """kohya's `ss_tag_frequency` ({folder: {tag: count}}): the word of each `<repeats>_<word>` folder (kohya's
    DreamBooth-style layout), otherwise each folder's most frequent tag."""
    try:
        freq = json.loads(meta.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    words: list[str] = []
    if not isinstance(freq, dict):
        return []
    for folder, tags in freq.items():
        m = _KOHYA_FOLDER.match(str(folder))
        if m:
            word = m["word"].strip()
        elif isinstance(tags, dict) and tags:
            word = str(max(tags.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 0)[0]).strip()
        else:
            continue
        if word and word not in words:
            words.append(word)
    return words


def convert(src: Path, dst: Path, base: Base) -> dict[str, str]:
    """Write `src` as this service's adapter file at `dst` (atomically) and return its metadata; AdapterError
    names the first keys or layers that do not fit `base`."""
    c = container.read(src)
    mapped = keys.map_keys(list(c.tensors), list(base.shapes))
    ranks = keys.check_shapes(mapped, c.shapes(), base.shapes)
    for old, new in mapped.rename.items():
        if new.endswith(".alpha"):
            c.scalar(old)  # a one-number float tensor, or refused here rather than when a worker loads it
    add = {f"{s}.alpha": float(ranks[s] or 1) for s in mapped.add_alpha}
    if c.metadata.get("format") == FORMAT and not mapped.add_alpha:
        meta = dict(c.metadata)  # trained here: its own metadata says what it is
    else:
        meta = _metadata(c, mapped, ranks, base)
    container.rewrite(c, dst, mapped.rename, meta, add)
    return meta


def _metadata(
    c: container.Container, mapped: keys.Mapped, ranks: dict[str, int | None], base: Base
) -> dict[str, str]:
    linear = [a for a in mapped.algorithms.values() if a != "norm"]
    algorithm = Counter(linear).most_common(1)[0][0] if linear else "norm"
    rank = Counter(r for r in ranks.values() if r is not None).most_common(1)
    alphas = [c.scalar(old) for old, new in mapped.rename.items() if new.endswith(".alpha")]
    steps = c.metadata.get("ss_steps", "0")
    config = {
        "algorithm": algorithm,
        "rank": rank[0][0] if rank else None,
        "alpha": alphas[0] if alphas else (float(rank[0][0]) if rank else None),
        "layout": mapped.layout,
        "modules": dict(Counter(mapped.algorithms.values())),
        "train_norm": "norm" in mapped.algorithms.values(),
        "targets": sorted(mapped.modules.values()),
    }
    kept = {k: v for k, v in c.metadata.items() if k.startswith("ss_") or k.startswith("modelspec.")}
    return {
        **kept,
        "format": FORMAT,
        "hdm_adapter_source": f"import:{mapped.layout}",
        "hdm_adapter_algorithm": algorithm,
        "hdm_adapter_config": json.dumps(config),
        "hdm_base_model": base.name,
        "hdm_base_sha256": base.sha256,
        "hdm_base_config": json.dumps(base.arch),
        "hdm_trigger_words": json.dumps(trigger_words(c.metadata)),
        "hdm_caption_sample": "",
        "hdm_training_steps": steps if steps.isdigit() else "0",
    }
