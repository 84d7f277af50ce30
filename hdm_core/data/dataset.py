"""The training data set: the images `scan_images` finds, decoded, cropped and captioned in DataLoader workers.

An unreadable, truncated or oversized ("decompression bomb") image is skipped, counted and replaced by another one,
never fatal. Samples are indexed by `(image_index, sample_seed)` from `StageSampler` (hdm_core.data.stream).
"""

from __future__ import annotations

import faulthandler
import logging
import random
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hdm_core.data.captions import CaptionConfig, process_caption
from hdm_core.data.crops import shifted_square_crop
from hdm_core.data.scan import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, read_caption, scan_images
from hdm_core.data.stream import StageSampler, mix_seed

logger = logging.getLogger(__name__)


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
        self.files = list(files) if files is not None else scan_images(self.root)
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
                "offset": crop.offset,
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
        "offsets": [s["offset"] for s in samples],
        "skipped": sum(s["skipped"] for s in samples),
    }


def _init_worker(_worker_id: int) -> None:
    """A SIGTERM to the rank's process group (torchrun stopping its ranks) is the rank's to handle: it writes a
    snapshot, which needs the next batches. The workers end with the rank (DataLoader's parent watchdog).
    `kill -USR1` dumps a worker's stacks as it does the rank's (hdm_core/train/__main__.py)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def make_loader(
    dataset: CaptionedImageDataset, sampler: StageSampler, *, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """Workers are spawned (a fresh interpreter), not forked from the rank: by the first step a rank runs
    threads (gloo's loop and work threads, tqdm's monitor), and a child forked while one of them holds a lock can
    hang before its first batch, an alive worker the DataLoader waits for without end while the other ranks wait
    in the first gradient all-reduce (Python's `os.fork` docs: fork in a multi-threaded process may deadlock the
    child; Python 3.14 stops forking by default for this reason)."""
    return DataLoader(
        dataset,
        batch_size=sampler.layout.micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_init_worker,
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )
