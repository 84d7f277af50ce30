"""Training data: a folder of captioned images, the shifted square crop, and a resumable distributed sampler.

Layout (spec §7): images (`.jpg .jpeg .png .webp`) at the top level of a folder or one subfolder deep, each with a
same-stem `.txt` caption next to it (missing caption = empty). Decoding runs in DataLoader workers; an unreadable,
truncated or oversized ("decompression bomb") image is skipped, counted and replaced by another one, never fatal.

Every random choice (crop offset, caption dropout/shuffle) is drawn from a per-sample seed derived from the run seed,
the stage and the sample's position in the global sample stream, so the data a step sees does not depend on the
number of DataLoader workers, on the number of ranks, or on whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hdm_core.captions import CaptionConfig, process_caption
from hdm_core.rope import position_map

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are treated as decompression bombs and skipped


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def scan_image_folder(root: str | Path) -> list[Path]:
    """Images at the top level of `root` or one folder deep, sorted by relative path (spec §7 layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    found: list[Path] = []
    for entry in root.iterdir():
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            found.extend(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_caption(image_path: Path) -> str:
    """The same-stem `.txt` next to the image, or "" if there is none."""
    caption_path = image_path.with_suffix(".txt")
    try:
        return caption_path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class CropResult:
    pixels: Tensor  # [3, size, size] in [-1, 1]
    pos_map: Tensor  # [(size // downsample) ** 2, 2] (y, x) at latent resolution
    addon: float  # ln(W / H) of the resized image, before the crop
    offset: int  # crop offset along the longer axis, in resized pixels
    resized_hw: tuple[int, int]


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) after resizing the shorter side to `size`, the longer one as torchvision's `Resize(int)` computes it."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_position_map(resized_hw: tuple[int, int], offset: int, size: int, latent: int) -> Tensor:
    """The pixel-resolution position map of the resized image, cropped like the pixels, `area`-reduced to latent.

    Spec §2 "Training crop map" and §7: built at pixel resolution of the resized image (long side spans [-1, 1]),
    cropped with the same offset, then reduced with `area` interpolation; the model resizes it to the patch grid.
    """
    h, w = resized_hw
    grid = position_map(h, w).view(h, w, 2)
    grid = grid[:, offset : offset + size] if w >= h else grid[offset : offset + size, :]
    grid = grid.permute(2, 0, 1).unsqueeze(0)  # [1, 2, size, size]
    if latent != size:
        grid = F.interpolate(grid, size=(latent, latent), mode="area")
    return grid[0].permute(1, 2, 0).reshape(latent * latent, 2).contiguous()


def shifted_square_crop(
    img: Image.Image, size: int, rng: random.Random, *, downsample: int = 1
) -> CropResult:
    """Spec §7: RGB, shorter side -> `size` (bicubic), a square at a random offset along the longer side.

    The offset is an integer uniform in [0, long - short) (exclusive, as the reference; 0 for square images).
    """
    if size % downsample:
        raise ValueError(f"crop size {size} must be a multiple of the codec downsample factor {downsample}")
    img = img.convert("RGB")
    new_w, new_h = resized_size(img.width, img.height, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    long_side = max(new_w, new_h)
    offset = rng.randrange(long_side - size) if long_side > size else 0
    box = (offset, 0, offset + size, size) if new_w >= new_h else (0, offset, size, offset + size)
    square = img.crop(box)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
    pos = crop_position_map((new_h, new_w), offset, size, size // downsample)
    # Aspect condition: ln(W/H) of the resized image (spec §7: the reference dataset's plain W/H is not used).
    return CropResult(pixels, pos, math.log(new_w / new_h), offset, (new_h, new_w))


class ImageLoadError(Exception):
    """An image could not be decoded (corrupt, truncated, unsupported or too large)."""


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode an image, refusing anything above `max_pixels` before decoding it."""
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; the warning is turned into an error below.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ImageLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc


class CaptionedImageDataset(Dataset):
    """Map-style dataset indexed by `(image_index, sample_seed)` pairs from `StageSampler`.

    A sample is a dict: pixels [3,S,S] in [-1,1], pos_map [(S/ds)^2, 2], addon (ln W/H), caption (processed),
    index, skipped (how many unreadable images were passed over to produce it).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        size: int,
        captions: CaptionConfig,
        downsample: int = 1,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_retries: int = 16,
        files: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = list(files) if files is not None else scan_image_folder(self.root)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}")
        self.size = size
        self.captions = captions
        self.downsample = downsample
        self.max_pixels = max_pixels
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.files)

    def with_size(self, size: int) -> CaptionedImageDataset:
        """The same files at another crop size (a new progressive-resolution stage)."""
        return CaptionedImageDataset(
            self.root,
            size=size,
            captions=self.captions,
            downsample=self.downsample,
            max_pixels=self.max_pixels,
            max_retries=self.max_retries,
            files=self.files,
        )

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = item
        skipped = 0
        for attempt in range(self.max_retries + 1):
            # A failed image is replaced by a deterministic other one, so batches keep their size and a resumed
            # or distributed run still sees exactly the same data.
            idx = index if attempt == 0 else mix_seed(sample_seed, "retry", attempt) % len(self.files)
            path = self.files[idx]
            try:
                img = load_image(path, self.max_pixels)
            except ImageLoadError as exc:
                skipped += 1
                logger.warning("skipping unreadable image %s", exc)
                continue
            rng = random.Random(sample_seed)
            crop = shifted_square_crop(img, self.size, rng, downsample=self.downsample)
            caption = process_caption(read_caption(path), self.captions, rng)
            return {
                "pixels": crop.pixels,
                "pos_map": crop.pos_map,
                "addon": torch.tensor(crop.addon, dtype=torch.float32),
                "caption": caption,
                "index": idx,
                "skipped": skipped,
            }
        raise RuntimeError(
            f"{self.max_retries + 1} images in a row could not be read from {self.root}; "
            "is the data folder broken?"
        )


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "pos_map": torch.stack([s["pos_map"] for s in samples]),
        "addon": torch.stack([s["addon"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "indices": [s["index"] for s in samples],
        "skipped": sum(s["skipped"] for s in samples),
    }


@dataclass(frozen=True)
class StreamLayout:
    """How optimizer steps map onto the stage's global sample stream.

    Step s consumes global positions [s*G, (s+1)*G) with G = micro_batch * grad_accum * world_size. Micro-step k on
    rank r reads slot j = k * world_size + r, i.e. positions s*G + j*micro_batch + [0, micro_batch). A single process
    with grad_accum = W therefore sees the same micro-batches as W ranks with grad_accum = 1.
    """

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def slot_start(self, step: int, micro: int, rank: int) -> int:
        return step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch


class StageSampler(Sampler[tuple[int, int]]):
    """Infinite, resumable, DistributedSampler-style stream of `(image_index, sample_seed)` for one rank.

    Epoch e is a permutation seeded by (seed, stage, e); the stream is the concatenation of epochs. Starting at
    `start_step` reproduces exactly what an uninterrupted run would have read from that step on.
    """

    def __init__(
        self,
        num_samples: int,
        layout: StreamLayout,
        *,
        rank: int,
        seed: int,
        stage: int,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside world of {layout.world_size}")
        self.num_samples = num_samples
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.stage = stage
        self.start_step = start_step
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: list[int] = []

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.stage, "epoch", epoch))
            self._perm = torch.randperm(self.num_samples, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def sample_seed(self, position: int) -> int:
        return mix_seed(self.seed, self.stage, "sample", position)

    def positions(self) -> Iterator[int]:
        lay = self.layout
        step = self.start_step
        while True:
            for micro in range(lay.grad_accum):
                start = lay.slot_start(step, micro, self.rank)
                yield from range(start, start + lay.micro_batch)
            step += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos in self.positions():
            yield self.index_at(pos), self.sample_seed(pos)


def _ignore_sigterm(_worker_id: int) -> None:
    """A SIGTERM to the rank's process group (torchrun stopping its ranks) is the rank's to handle: it saves a
    checkpoint, which needs the next batches. The workers end with the rank (DataLoader's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: CaptionedImageDataset, sampler: StageSampler, *, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=sampler.layout.micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_ignore_sigterm,
    )
