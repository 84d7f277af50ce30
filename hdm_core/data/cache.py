"""Training caches: VAE latents per (image content, crop) and text embeddings per caption variant (safetensors).

Layout under the cache folder (`[cache] dir`, shared between runs, or RUN_DIR/cache)::

    latents/<codec id>/<ab>/<image sha256>.safetensors   # "<size>_<offset>": the VAE's Gaussian (2C, h, w)
    text/<text encoder id>-L<max_length>/<ab>/<caption sha256>.safetensors   # "<variant sha256>": (L, D)

Keys: an image is its content's sha256 (a changed file is a new entry; its old one is never read again), the codec
and text encoder are the sha256 of their weights and configuration (`module_identity`), so another VAE or text
encoder never reads these entries. The latent cache stores the encoder's distribution (mean, log-variance), not a
sample: the trainer draws the latent with the step's own seed, as the uncached path does. A text file holds the
processed variants of one raw caption (tag shuffle/dropout, caption dropout), at most `max_variants` of them; the
planner (`plan_run`) lists the exact crops and variants a run's deterministic sample stream reads, so caching
changes no sample, and what is not cached is encoded online.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn

from hdm_core.data.captions import CaptionConfig, process_caption
from hdm_core.data.crops import crop_offset
from hdm_core.data.scan import read_caption
from hdm_core.data.stream import StageSampler, StreamLayout


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def module_identity(module: nn.Module, config: object) -> str:
    """sha256 of a frozen module's weights (names, dtypes, shapes, bytes) and its configuration."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TensorStore:
    """One safetensors file per key (sharded by its first two hex digits), each holding named tensors; files are
    read once and kept in memory, and rewritten atomically when entries are added."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, dict[str, Tensor]] = {}

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def entries(self, key: str) -> dict[str, Tensor]:
        if key not in self._loaded:
            path = self.path(key)
            found: dict[str, Tensor] = {}
            if path.is_file():
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    found = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            self._loaded[key] = found
        return self._loaded[key]

    def add(self, key: str, tensors: dict[str, Tensor]) -> None:
        from hdm_core.checkpoint import atomic_save_file

        merged = {**self.entries(key), **{k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(merged, self.path(key), {})
        self._loaded[key] = merged


@dataclass
class RunPlan:
    """What a run's sample stream reads: crops per image (by content hash) and caption variants per raw caption."""

    image_sha: list[str]  # per file index
    crops: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # file index -> {(size, offset)}
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # raw caption -> {variant sha: text}


@dataclass(frozen=True)
class StagePlan:
    stage: int
    size: int
    steps: int
    layout: StreamLayout
    captions: CaptionConfig


def plan_run(
    files: list[Path], stages: Iterable[StagePlan], *, seed: int, shuffle: bool, max_variants: int
) -> RunPlan:
    """Replay the stages' sample streams (`StageSampler`, the dataset's crop draw and caption transform) without
    decoding an image: the crops and caption variants the run will read. Unreadable images are left out (the
    trainer skips them)."""
    plan = RunPlan(image_sha=[file_sha256(f) for f in files])
    sizes: dict[int, tuple[int, int] | None] = {}
    raw = {i: read_caption(f) for i, f in enumerate(files)}
    for st in stages:
        sampler = StageSampler(len(files), st.layout, rank=0, seed=seed, stage=st.stage, shuffle=shuffle)
        for pos in range(st.steps * st.layout.global_batch):
            index = sampler.index_at(pos)
            if index not in sizes:
                try:
                    with Image.open(files[index]) as img:
                        sizes[index] = img.size
                except OSError:
                    sizes[index] = None
            if sizes[index] is None:
                continue
            rng = random.Random(sampler.sample_seed(pos))
            plan.crops.setdefault(index, set()).add((st.size, crop_offset(*sizes[index], st.size, rng)))
            variants = plan.variants.setdefault(raw[index], {})
            if len(variants) < max_variants:
                text = process_caption(raw[index], st.captions, rng)
                variants.setdefault(text_sha256(text), text)
    return plan


class LatentCache:
    """The VAE's Gaussian per (image sha256, crop size, offset), for one codec identity."""

    def __init__(self, root: Path, codec_id: str) -> None:
        self.store = TensorStore(root / "latents" / codec_id[:32])

    @staticmethod
    def name(size: int, offset: int) -> str:
        return f"{size}_{offset}"

    def get(self, image_sha: str, size: int, offset: int) -> Tensor | None:
        return self.store.entries(image_sha).get(self.name(size, offset))

    def missing(self, plan: RunPlan) -> dict[int, list[tuple[int, int]]]:
        """file index -> crops not cached yet."""
        out = {}
        for index, crops in plan.crops.items():
            have = self.store.entries(plan.image_sha[index])
            todo = sorted(c for c in crops if self.name(*c) not in have)
            if todo:
                out[index] = todo
        return out

    def add(self, image_sha: str, moments: dict[tuple[int, int], Tensor]) -> None:
        self.store.add(image_sha, {self.name(*k): v for k, v in moments.items()})


class TextCache:
    """Text-encoder states per processed caption, grouped by raw caption, for one encoder identity and length."""

    def __init__(self, root: Path, encoder_id: str, max_length: int) -> None:
        self.store = TensorStore(root / "text" / f"{encoder_id[:32]}-L{max_length}")
        self._owner: dict[str, str] = {}  # variant sha -> raw caption sha, for lookups by processed text

    def get(self, text: str) -> Tensor | None:
        variant = text_sha256(text)
        owner = self._owner.get(variant)
        return None if owner is None else self.store.entries(owner).get(variant)

    def missing(self, plan: RunPlan) -> dict[str, dict[str, str]]:
        """raw caption sha -> {variant sha: text} not cached yet; registers every planned variant for `get`."""
        out: dict[str, dict[str, str]] = {}
        for raw, variants in plan.variants.items():
            owner = text_sha256(raw)
            have = self.store.entries(owner)
            for variant, text in variants.items():
                self._owner[variant] = owner
                if variant not in have:
                    out.setdefault(owner, {})[variant] = text
        return out

    def add(self, owner: str, states: dict[str, Tensor]) -> None:
        self.store.add(owner, states)
