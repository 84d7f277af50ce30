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
changes no sample, and what is not cached is encoded online. Under torchrun each rank hashes its share of the files
(`scan_facts`) and builds the keys it `owned` (about 1/world_size of the records); reads are memory maps (`TensorStore`).
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
    """One safetensors file per key (sharded by its first two hex digits), each holding named tensors.

    Reads go through safetensors' memory map (`safe_open`): a lookup maps the file, takes the one tensor it needs
    (a view of the map, no copy) and keeps nothing, so a rank holds only the micro-batch it reads and every rank
    shares the page cache. A file is rewritten atomically when entries are added (readers keep the old inode);
    each key is written by one rank only (`owned`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def names(self, key: str) -> set[str]:
        """The entry names of a key's file (its header only; empty when there is no file)."""
        path = self.path(key)
        if not path.is_file():
            return set()
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())

    def get(self, key: str, name: str) -> Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name) if name in f.keys() else None  # noqa: SIM118

    def add(self, key: str, tensors: dict[str, Tensor]) -> None:
        from hdm_core.checkpoint import atomic_save_file

        old: dict[str, Tensor] = {}
        if self.path(key).is_file():
            with safe_open(str(self.path(key)), framework="pt", device="cpu") as f:
                old = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
        merged = {**old, **{k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(merged, self.path(key), {})


@dataclass(frozen=True)
class FileFacts:
    """What planning needs of one image file: its content hash, its size (None: unreadable) and raw caption."""

    sha256: str
    size: tuple[int, int] | None
    caption: str


def scan_facts(files: list[Path], indices: Iterable[int]) -> dict[int, FileFacts]:
    """Hash, measure (header only) and read the caption of `files[i]` for each i: a rank scans its share."""
    out = {}
    for i in indices:
        try:
            with Image.open(files[i]) as img:
                size: tuple[int, int] | None = img.size
        except OSError:
            size = None
        out[i] = FileFacts(file_sha256(files[i]), size, read_caption(files[i]))
    return out


def owned(keys: list[str], rank: int, world_size: int) -> set[str]:
    """The cache keys one rank builds: the i-th key (in the order the run first reads them) goes to rank
    i mod world_size, so every rank builds about 1/world_size of the records and no file has two writers."""
    return {k for i, k in enumerate(keys) if i % world_size == rank}


@dataclass
class RunPlan:
    """What a run's sample stream reads: crops per image (by content hash) and caption variants per raw caption."""

    image_sha: list[str]  # per file index
    crops: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # file index -> {(size, offset)}
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # raw caption -> {variant sha: text}

    def image_keys(self) -> list[str]:
        """Image hashes in the order of the first file index read (one key per distinct content)."""
        return list(dict.fromkeys(self.image_sha[i] for i in sorted(self.crops)))

    def caption_keys(self) -> list[str]:
        """Raw caption hashes in the order the stream first reads them."""
        return [text_sha256(raw) for raw in self.variants]


@dataclass(frozen=True)
class StagePlan:
    stage: int
    size: int
    steps: int
    layout: StreamLayout
    captions: CaptionConfig


def plan_run(
    facts: list[FileFacts], stages: Iterable[StagePlan], *, seed: int, shuffle: bool, max_variants: int
) -> RunPlan:
    """Replay the stages' sample streams (`StageSampler`, the dataset's crop draw and caption transform) from the
    files' facts, without opening a file: the crops and caption variants the run will read. Unreadable images are
    left out (the trainer skips them)."""
    plan = RunPlan(image_sha=[f.sha256 for f in facts])
    for st in stages:
        sampler = StageSampler(len(facts), st.layout, rank=0, seed=seed, stage=st.stage, shuffle=shuffle)
        for pos in range(st.steps * st.layout.global_batch):
            index = sampler.index_at(pos)
            size, raw = facts[index].size, facts[index].caption
            if size is None:
                continue
            rng = random.Random(sampler.sample_seed(pos))
            plan.crops.setdefault(index, set()).add((st.size, crop_offset(*size, st.size, rng)))
            variants = plan.variants.setdefault(raw, {})
            if len(variants) < max_variants:
                text = process_caption(raw, st.captions, rng)
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
        return self.store.get(image_sha, self.name(size, offset))

    def missing(self, plan: RunPlan, keys: set[str]) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        """image sha (of `keys`) -> (a file index with that content, crops not cached yet)."""
        wanted: dict[str, tuple[int, set[tuple[int, int]]]] = {}
        for index in sorted(plan.crops):
            sha = plan.image_sha[index]
            if sha in keys:
                wanted.setdefault(sha, (index, set()))[1].update(plan.crops[index])
        out = {}
        for sha, (index, crops) in wanted.items():
            have = self.store.names(sha)
            todo = sorted(c for c in crops if self.name(*c) not in have)
            if todo:
                out[sha] = (index, todo)
        return out

    def add(self, image_sha: str, moments: dict[tuple[int, int], Tensor]) -> None:
        self.store.add(image_sha, {self.name(*k): v for k, v in moments.items()})


class TextCache:
    """Text-encoder states per processed caption, grouped by raw caption, for one encoder identity and length."""

    def __init__(self, root: Path, encoder_id: str, max_length: int, plan: RunPlan) -> None:
        self.store = TensorStore(root / "text" / f"{encoder_id[:32]}-L{max_length}")
        # variant sha -> raw caption sha: every variant the run plans to read, for lookups by processed text
        self._owner = {v: text_sha256(raw) for raw, vs in plan.variants.items() for v in vs}
        self._plan = plan

    def get(self, text: str) -> Tensor | None:
        variant = text_sha256(text)
        owner = self._owner.get(variant)
        return None if owner is None else self.store.get(owner, variant)

    def missing(self, keys: set[str]) -> dict[str, dict[str, str]]:
        """raw caption sha (of `keys`) -> {variant sha: text} not cached yet."""
        out: dict[str, dict[str, str]] = {}
        for raw, variants in self._plan.variants.items():
            owner = text_sha256(raw)
            if owner not in keys:
                continue
            have = self.store.names(owner)
            todo = {v: t for v, t in variants.items() if v not in have}
            if todo:
                out[owner] = todo
        return out

    def add(self, owner: str, states: dict[str, Tensor]) -> None:
        self.store.add(owner, states)
