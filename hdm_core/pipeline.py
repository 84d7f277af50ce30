"""Text-to-image pipeline: prompts in, PIL images and their seeds out (spec §8)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import load_checkpoint, trained_text_length
from .codec import Codec
from .config import MAX_SEED
from .model import XUT
from .rope import position_map
from .sampler import SAMPLERS, Conditioning, StepCallback, guided_velocity, timesteps
from .text import TextEncoder


@dataclass(frozen=True)
class Camera:
    """Position-map camera (spec §2): shifts are added, then everything is divided by zoom."""

    x_shift: float = 0.0
    y_shift: float = 0.0
    zoom: float = 1.0


@dataclass(frozen=True)
class TreadGuidance:
    """TREAD as autoguidance (spec §3): the uncond branch runs the routed, weaker model."""

    cond_rate: float = 0.0
    uncond_rate: float = 0.0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    latents: Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL RGB images."""
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """One CPU fp32 generator per image (spec §8), so image i depends on its own seed only. -> [B, C, h, w]."""
    noise = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(noise).to(device)


def _routing_generators(seeds: list[int]) -> list[torch.Generator]:
    # Separate streams from the noise generators; only used when a branch routes tokens.
    return [torch.Generator("cpu").manual_seed((s + 0x5EED) % 2**63) for s in seeds]


def sample_latents(
    model: XUT,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    steps: int,
    guidance_scale: float,
    sampler: str = "euler",
    shift: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Integrate the guided velocity field from noise [B, C, h, w] (t = 1) to a latent (t = 0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {sorted(SAMPLERS)}")
    velocity = guided_velocity(model, cond, uncond, guidance_scale)
    dtype = next(model.parameters()).dtype
    # The ODE state stays fp32; the network runs in its own dtype.
    return SAMPLERS[sampler](
        lambda x, t: velocity(x.to(dtype), t).float(),
        noise.float(),
        timesteps(steps, shift=shift),
        callback=callback,
    )


class HDMPipeline:
    """XUT + codec + text encoder, loaded once, on one device and dtype."""

    def __init__(
        self,
        model: XUT,
        codec: Codec,
        text_encoder: TextEncoder,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_length: int | None = None,
    ) -> None:
        """`text_length`: pad (and truncate) the prompt and the negative prompt to this many tokens, as the model was
        trained (spec §4: training pads every caption to max_length, and pad states enter XUT unmasked, so a model
        trained on short captions reads them). None: the reference's inference padding (to the longest prompt; no
        padding for one prompt), right for the released weights."""
        if text_length is not None and text_length < 1:
            raise ValueError(f"text_length must be >= 1 or None, got {text_length}")
        self.text_length = text_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.codec = codec.to(self.device)
        self.text_encoder = text_encoder
        if text_encoder.hidden_size != model.config.ctx_dim:
            raise ValueError(
                f"text encoder width {text_encoder.hidden_size} != model ctx_dim {model.config.ctx_dim}"
            )

    @classmethod
    def from_paths(
        cls,
        checkpoint: str | Path,
        text_encoder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae: str | Path | None = None,
    ) -> HDMPipeline:
        """A checkpoint file (with its VAE inside, or pixel space, or `vae` = a diffusers folder) + an LM folder."""
        from .codec import VaeCodec

        loaded = load_checkpoint(checkpoint, device=device, dtype=dtype)
        codec = VaeCodec.from_folder(vae) if vae is not None else loaded.codec
        if codec is None:
            raise ValueError(f"{checkpoint} carries no VAE and is not a pixel-space model: pass vae=<folder>")
        if isinstance(codec, VaeCodec) and dtype != torch.float32:
            codec.vae.to(dtype)
        te = TextEncoder.from_pretrained(text_encoder, device=device, dtype=dtype)
        return cls(
            loaded.model,
            codec,
            te,
            device=device,
            dtype=dtype,
            text_length=trained_text_length(loaded.metadata),
        )

    def _encode(self, prompts: list[str]) -> Tensor:
        if self.text_length is None:
            return self.text_encoder.encode(prompts)
        return self.text_encoder.encode(prompts, padding="max_length", max_length=self.text_length)

    @property
    def downsample(self) -> int:
        return self.codec.downsample

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample * self.model.config.patch_size

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        if width % m or height % m or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {m}, got {width}x{height}")

    def _conditioning(
        self, ctx: Tensor, n: int, pos: Tensor, addon: Tensor, rate: float, seeds: list[int]
    ) -> Conditioning:
        ctx = (
            ctx.to(self.device, self.dtype).expand(n, -1, -1)
            if ctx.shape[0] == 1
            else ctx.to(self.device, self.dtype)
        )
        return Conditioning(ctx, pos, addon, rate, _routing_generators(seeds) if rate > 0 else None)

    def generate(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str = "",
        n: int = 1,
        width: int = 1024,
        height: int = 1024,
        steps: int = 24,
        guidance_scale: float = 3.0,
        seed: int | None = None,
        sampler: str = "euler",
        shift: float = 1.0,
        camera: Camera = Camera(),
        tread: TreadGuidance = TreadGuidance(),
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """`n` images per prompt; image i uses seed + i and is reproduced exactly by a batch of one with that seed."""
        self.check_size(width, height)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if seed is None:
            seed = random.randrange(0, 2**32)
        b = len(prompts) * n
        if not 0 <= seed <= MAX_SEED - b:
            raise ValueError(f"seed must be in [0, 2^63 - 1 - batch], got {seed}")
        seeds = [seed + i for i in range(b)]
        h, w = height // self.downsample, width // self.downsample

        cond_ctx = self._encode(prompts).repeat_interleave(n, dim=0)
        pos = position_map(
            h, w, x_shift=camera.x_shift, y_shift=camera.y_shift, zoom=camera.zoom, device=self.device
        ).expand(b, -1, -1)
        addon = torch.full((b,), math.log(width / height), device=self.device)
        cond = self._conditioning(cond_ctx, b, pos, addon, tread.cond_rate, seeds)
        uncond = None
        if guidance_scale != 1.0:
            uncond = self._conditioning(
                self._encode([negative_prompt]), b, pos, addon, tread.uncond_rate, seeds
            )

        noise = initial_noise(seeds, (self.model.config.in_channels, h, w), self.device)
        latents = sample_latents(
            self.model,
            noise,
            cond,
            uncond,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            shift=shift,
            callback=callback,
        )
        images = self.codec.decode(latents.to(self.dtype))
        return GenerationResult(images=to_pil(images), seeds=seeds, latents=latents)
