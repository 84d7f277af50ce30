"""The shifted square crop and its position map (spec §2 "Training crop map", spec §7)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hdm_core.rope import position_map


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


def crop_offset(width: int, height: int, size: int, rng: random.Random) -> int:
    """The crop's offset along the longer side: uniform in [0, long - short) (exclusive, as the reference; 0 for
    square images). The one draw from `rng` a crop makes (the training caches replay it without the pixels)."""
    new_w, new_h = resized_size(width, height, size)
    long_side = max(new_w, new_h)
    return rng.randrange(long_side - size) if long_side > size else 0


def shifted_square_crop(
    img: Image.Image, size: int, rng: random.Random, *, downsample: int = 1
) -> CropResult:
    """Spec §7: RGB, shorter side -> `size` (bicubic), a square at a random offset along the longer side."""
    return square_crop(img, size, crop_offset(img.width, img.height, size, rng), downsample=downsample)


def square_crop(img: Image.Image, size: int, offset: int, *, downsample: int = 1) -> CropResult:
    """The shifted square crop at a given offset (see `shifted_square_crop`)."""
    if size % downsample:
        raise ValueError(f"crop size {size} must be a multiple of the codec downsample factor {downsample}")
    img = img.convert("RGB")
    new_w, new_h = resized_size(img.width, img.height, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    box = (offset, 0, offset + size, size) if new_w >= new_h else (0, offset, size, offset + size)
    square = img.crop(box)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
    pos = crop_position_map((new_h, new_w), offset, size, size // downsample)
    # Aspect condition: ln(W/H) of the resized image (spec §7: the reference dataset's plain W/H is not used).
    return CropResult(pixels, pos, math.log(new_w / new_h), offset, (new_h, new_w))
