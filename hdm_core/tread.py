"""TREAD token routing (spec §3): a random subset of image tokens skips the backbone; text is always kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import repeat
from torch import Tensor


class Route(NamedTuple):
    """Indices into the full [image; text] sequence of the tokens that go through the backbone, [B, K]."""

    keep: Tensor


def kept_image_tokens(n_image: int, rate: float) -> int:
    """rate is the fraction of image tokens dropped; keep N - int(N * rate) (spec §3)."""
    return n_image - int(n_image * rate)


def make_route(
    batch: int,
    n_image: int,
    n_text: int,
    rate: float,
    *,
    device: torch.device,
    generators: Sequence[torch.Generator] | None = None,
) -> Route:
    """A fresh uniform subset per sample, kept in original order, followed by every text token.

    With `generators` (one per sample, CPU) each sample's choice depends only on its own generator, so an image of
    a batch routes as it would alone; without, torch's global RNG is used as the reference does.
    """
    if generators is not None and len(generators) != batch:
        raise ValueError(f"need one routing generator per sample: got {len(generators)} for batch {batch}")
    n_keep = kept_image_tokens(n_image, rate)
    rows = []
    for i in range(batch):
        gen = generators[i] if generators is not None else None
        perm = torch.randperm(n_image, generator=gen, device="cpu")
        rows.append(perm[:n_keep].sort().values)
    image_idx = torch.stack(rows).to(device)  # (B, K_img)
    text_idx = torch.arange(n_image, n_image + n_text, device=device).expand(batch, n_text)
    return Route(torch.cat([image_idx, text_idx], dim=1))


def gather_tokens(x: Tensor, route: Route) -> Tensor:
    """x [B, L, C] -> [B, K, C]."""
    return torch.gather(x, 1, repeat(route.keep, "b k -> b k c", c=x.shape[-1]))


def scatter_tokens(full: Tensor, routed: Tensor, route: Route) -> Tensor:
    """Put routed [B, K, D] back into a copy of full [B, L, D]; dropped tokens keep full's values."""
    return full.scatter(1, repeat(route.keep, "b k -> b k d", d=full.shape[-1]), routed)
