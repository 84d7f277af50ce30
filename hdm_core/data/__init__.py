"""Training data: the folder scan (one rule), captions, crops, the streaming stage sampler and the data set.

`hdm_core.data.scan` and `hdm_core.data.captions` import no torch (the API validates datasets with them); the
exports below resolve lazily so importing this package does not import torch either.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MAX_IMAGE_PIXELS": "scan",
    "IMAGE_EXTENSIONS": "scan",
    "dataset_stats": "scan",
    "read_caption": "scan",
    "scan_images": "scan",
    "CaptionConfig": "captions",
    "clean_caption": "captions",
    "parse_caption": "captions",
    "process_caption": "captions",
    "CropResult": "crops",
    "crop_position_map": "crops",
    "resized_size": "crops",
    "shifted_square_crop": "crops",
    "StageSampler": "stream",
    "StreamLayout": "stream",
    "mix_seed": "stream",
    "CaptionedImageDataset": "dataset",
    "ImageLoadError": "dataset",
    "collate": "dataset",
    "load_image": "dataset",
    "make_loader": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hdm_core.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
