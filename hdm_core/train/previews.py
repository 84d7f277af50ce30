"""Preview grids written during training (`[sampling] every = N`): one row of the sampling prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from hdm_core.codec import Codec
from hdm_core.model import XUT
from hdm_core.text import TextEncoder
from hdm_core.train.config import SamplingSection


def save_preview(
    path: Path,
    model: XUT,
    codec: Codec,
    text_encoder: TextEncoder,
    sampling: SamplingSection,
    *,
    resolution: int,
    text_length: int,
    device: torch.device,
) -> None:
    """Sample the prompts at `resolution` with the current weights (eval mode, restored after) into one PNG."""
    from hdm_core.pipeline import HDMPipeline  # the sampling stack is only needed when previews are on

    pipe = HDMPipeline(
        model, codec, text_encoder, device=device, dtype=torch.float32, text_length=text_length
    )
    try:
        result = pipe.generate(
            list(sampling.prompts),
            width=resolution,
            height=resolution,
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=sampling.seed,
        )
    finally:
        model.train()
    path.parent.mkdir(exist_ok=True)
    grid = Image.new("RGB", (resolution * len(result.images), resolution))
    for i, img in enumerate(result.images):
        grid.paste(img, (i * resolution, 0))
    grid.save(path)
