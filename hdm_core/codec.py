"""Latent codecs: a diffusers AutoencoderKL with per-channel mean/std (spec §5), or plain pixels in [-1, 1]."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

CodecKind = Literal["pixel", "vae"]


class Codec(Protocol):
    kind: CodecKind
    downsample: int
    latent_channels: int

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, H/f, W/f]."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [0, 1]."""
        ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Codec: ...


class PixelCodec(nn.Module):
    """Identity codec for small models trained in pixel space: the 'latent' is the image in [-1, 1]."""

    kind: CodecKind = "pixel"
    downsample = 1
    latent_channels = 3

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)


_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_vae_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old diffusers attention names (query/key/value/proj_attn) -> current ones (to_q/to_k/to_v/to_out.0)."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        out[f"{m[1]}{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else key] = value
    return out


def infer_vae_config(sd: dict[str, Tensor]) -> dict[str, Any]:
    """AutoencoderKL arguments from weight shapes (the released file carries no VAE config).

    GroupNorm group counts are not visible in shapes; 32 is the SDXL VAE's value (spec §5).
    """
    n_down = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    layers = 1 + max(
        int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))
    )
    channels = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(n_down)]
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "down_block_types": ["DownEncoderBlock2D"] * n_down,
        "up_block_types": ["UpDecoderBlock2D"] * n_down,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in sd),
    }


class VaeCodec(nn.Module):
    """z_norm = (z - mean) / std per channel; decode z * std + mean, then x/2 + 0.5 clamped (spec §5)."""

    kind: CodecKind = "vae"

    def __init__(self, vae: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.vae = vae
        channels = int(vae.config.latent_channels)
        self.register_buffer("vae_mean", mean.reshape(1, channels, 1, 1).float().clone())
        self.register_buffer("vae_std", std.reshape(1, channels, 1, 1).float().clone())
        self.vae.requires_grad_(False)
        self.vae.eval()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.vae.config)

    @classmethod
    def from_folder(cls, folder: str | Path) -> VaeCodec:
        """A diffusers AutoencoderKL folder; mean/std from `latents_mean`/`latents_std` in its config."""
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"VAE folder {folder} has no config.json (expected a diffusers AutoencoderKL)"
            )
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        cfg = vae.config
        channels = int(cfg.latent_channels)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean, std = torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)
        else:  # a VAE without per-channel statistics: fall back to SD-style scaling
            mean = torch.zeros(channels)
            std = torch.full((channels,), 1.0 / float(getattr(cfg, "scaling_factor", 1.0)))
        return cls(vae, mean, std)

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, Tensor], mean: Tensor, std: Tensor, config: dict[str, Any] | None = None
    ) -> VaeCodec:
        """Weights under diffusers names (the `vae.` prefix already stripped)."""
        from diffusers import AutoencoderKL

        sd = _modern_vae_keys(sd)
        vae = AutoencoderKL(**(config or infer_vae_config(sd)))
        missing, unexpected = vae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"VAE weights do not fit the AutoencoderKL config: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}"
            )
        return cls(vae, mean, std)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The released layout: `vae.*`, `vae_mean`, `vae_std`."""
        out = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        out["vae_mean"], out["vae_std"] = self.vae_mean, self.vae_std
        return out

    def config_json(self) -> str:
        keys = (
            "in_channels",
            "out_channels",
            "latent_channels",
            "down_block_types",
            "up_block_types",
            "block_out_channels",
            "layers_per_block",
            "norm_num_groups",
            "mid_block_add_attention",
        )
        return json.dumps({k: self.config[k] for k in keys if k in self.config})

    @torch.no_grad()
    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_moments(self.encode_moments(images), generator=generator).to(images.dtype)

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> the encoder's Gaussian [B, 2C, H/f, W/f] (mean, log-variance): the deterministic
        part of `encode`, what the training latent cache stores."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.parameters

    @torch.no_grad()
    def sample_moments(self, moments: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A latent drawn from `encode_moments`' Gaussian with `generator`, normalised (fp32) [B, C, h, w]."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        z = DiagonalGaussianDistribution(moments).sample(generator)
        return (z.float() - self.vae_mean) / self.vae_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.float() * self.vae_std + self.vae_mean
        x = self.vae.decode(z.to(self.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)
