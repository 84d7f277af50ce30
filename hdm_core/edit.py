"""Image-to-image and inpainting for the rectified flow x_t = t·eps + (1 - t)·x_0 (spec §6; t = 1 is noise).

Image-to-image: the init image is encoded by the model's codec, noised to t = strength with the job's noise (the same
per-seed draw as text-to-image, `pipeline.initial_noise`), and the sampler runs the rest of the text-to-image
schedule: start at t = strength, then every schedule time below it (`edit_timesteps`). With the uniform schedule that
is ceil(steps · strength) steps, the first one possibly shorter; strength 1 is text-to-image exactly, strength 0 runs
no step and returns decode(encode(init)).

Inpainting adds a mask (white = repaint): after every step the unmasked latents are replaced by the original noised to
the step's time with that same noise, and the decoded image is composited with the full-resolution mask so every
pixel the mask leaves at 0 is the original's, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .codec import Codec
from .sampler import ProjectFn

EditMode = Literal["img2img", "inpaint"]
# The init latent is a property of the image, not of the job's seed: every image of a batch starts from the same
# encode, so image i of a batch equals a batch of one with its seed (a VAE encode samples its posterior, spec §5).
ENCODE_SEED = 0


@dataclass(frozen=True)
class EditSpec:
    """An init image (any mode; converted to RGB) and optional mask (L or convertible; white = repaint, grey =
    partial) of the same size. `mask_blur`: Gaussian sigma in pixels of the inward edge feather (`feathered_mask`)."""

    image: Image.Image
    strength: float = 0.75
    mask: Image.Image | None = None
    mask_blur: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0 or math.isnan(self.strength):
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.mask_blur <= 64.0:
            raise ValueError(f"mask_blur must be in [0, 64] pixels, got {self.mask_blur}")
        if self.mask is not None and self.mask.size != self.image.size:
            raise ValueError(f"mask size {self.mask.size} differs from image size {self.image.size}")

    @property
    def mode(self) -> EditMode:
        return "img2img" if self.mask is None else "inpaint"


@dataclass(frozen=True)
class EditInfo:
    """What an edit did, for the image's parameters text."""

    mode: EditMode
    strength: float
    mask_blur: float
    steps_run: int

    def parameters_fields(self) -> list[str]:
        """A1111-style `key: value` fields (A1111's own names where it has one)."""
        fields = [f"Edit mode: {self.mode}", f"Denoising strength: {self.strength:g}"]
        if self.mode == "inpaint":
            fields.append(f"Mask blur: {self.mask_blur:g}")
        return fields


def fit(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """Scale to cover width x height keeping the aspect ratio, then centre-crop. A same-size image is unchanged."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    left, top = (w - width) // 2, (h - height) // 2
    return image.resize((w, h), resample).crop((left, top, left + width, top + height))


def _to_tensor(image: Image.Image) -> Tensor:
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255  # (1, C, H, W) in [0, 1]


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian on [B, 1, H, W], edges replicated (a mask touching the border stays 1 there)."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def feathered_mask(mask: Tensor, blur_px: float) -> Tensor:
    """mask [B, 1, H, W] in [0, 1] -> the compositing alpha: mask · blur(mask).

    The feather runs inward only, so every pixel the mask leaves at 0 stays at 0 (kept exactly) while the repaint
    fades in over about 2·blur_px pixels inside the edge."""
    return mask if blur_px <= 0 else mask * _gaussian_blur(mask, blur_px)


def latent_mask(alpha: Tensor, downsample: int) -> Tensor:
    """Pixel alpha [B, 1, H, W] -> latent grid [B, 1, H/f, W/f]: a cell is as free as its most-repainted pixel, so no
    pixel meant to change is pinned to the original in latent space (the final composite restores the rest)."""
    return alpha if downsample == 1 else F.max_pool2d(alpha, downsample)


def edit_timesteps(ts: Tensor, strength: float) -> Tensor:
    """The schedule's tail from t = strength: [strength, every t in ts below it]. strength 1 gives ts itself."""
    start = ts.new_tensor([strength])
    return torch.cat([start, ts[ts < start]])


@dataclass(frozen=True)
class EditPlan:
    """Everything the sampler and the decoder need: the start state at ts[0], the times, the per-step projection, and
    the original image and alpha for the final composite."""

    start: Tensor  # (B, C, h, w), fp32
    ts: Tensor
    project: ProjectFn | None
    original: Tensor  # (1, 3, H, W) in [0, 1]
    alpha: Tensor | None  # (1, 1, H, W) in [0, 1]; None for image-to-image
    info: EditInfo

    def composite(self, images: Tensor) -> Tensor:
        """Decoded images [B, 3, H, W] in [0, 1] -> alpha · images + (1 - alpha) · original; alpha 0 is the original
        bit for bit."""
        if self.alpha is None:
            return images
        alpha = self.alpha.to(images.device, images.dtype)
        original = self.original.to(images.device, images.dtype)
        return torch.where(alpha > 0, alpha * images + (1 - alpha) * original, original)


def _projection(x0: Tensor, noise: Tensor, keep: Tensor) -> ProjectFn:
    """x <- m·x + (1 - m)·(t·eps + (1 - t)·x0) with m = 1 - keep: the unmasked region follows the original's path."""

    def project(x: Tensor, t: Tensor) -> Tensor:
        t = t.to(x.dtype)
        return x * (1 - keep) + (t * noise + (1 - t) * x0) * keep

    return project


def plan_edit(
    spec: EditSpec, codec: Codec, noise: Tensor, ts: Tensor, *, width: int, height: int
) -> EditPlan:
    """noise [B, C, h, w] (the job's per-seed draw), ts the text-to-image schedule -> the edit's plan.

    The init image and mask are fitted to width x height (`fit`: cover, then centre-crop; Lanczos for the image,
    bilinear for the mask)."""
    device = noise.device
    original = _to_tensor(fit(spec.image.convert("RGB"), width, height, Image.Resampling.LANCZOS))
    x0 = codec.encode(
        (original * 2 - 1).to(device), generator=torch.Generator("cpu").manual_seed(ENCODE_SEED)
    ).float()
    if x0.shape[1:] != noise.shape[1:]:
        raise ValueError(
            f"codec latent {tuple(x0.shape[1:])} does not match the model's {tuple(noise.shape[1:])}"
        )
    x0 = x0.expand_as(noise)
    ts = edit_timesteps(ts, spec.strength)
    t0 = ts[0]
    start = t0 * noise + (1 - t0) * x0
    alpha, project = None, None
    if spec.mask is not None:
        mask = _to_tensor(fit(spec.mask.convert("L"), width, height, Image.Resampling.BILINEAR))
        alpha = feathered_mask(mask, spec.mask_blur)
        keep = 1 - latent_mask(alpha, codec.downsample).to(device)
        project = _projection(x0, noise, keep)
        start = project(start, t0)
    info = EditInfo(spec.mode, spec.strength, spec.mask_blur, len(ts) - 1)
    return EditPlan(start, ts, project, original, alpha, info)
