"""What a run trains with, built from its config: the network, the frozen codec, the frozen text encoder."""

from __future__ import annotations

import logging

import torch

from hdm_core.checkpoint import load_checkpoint
from hdm_core.codec import Codec, PixelCodec, VaeCodec
from hdm_core.model import XUT
from hdm_core.text import TextEncoder
from hdm_core.train.config import TrainConfig, TrainConfigError

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig) -> XUT:
    """From `init_from`'s weights, or freshly initialised from the run seed (identical on every rank)."""
    if cfg.model.init_from:
        loaded = load_checkpoint(cfg.model.init_from, load_codec=False)
        logger.info("fine-tuning from %s", cfg.model.init_from)
        model = loaded.model
    else:
        arch = cfg.resolve_model_config()
        assert arch is not None  # no init_from: preset or arch decides
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
            model = XUT(arch)
    model = model.float().train()
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return model


def build_codec(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Codec:
    if cfg.codec.kind == "pixel":
        return PixelCodec()
    if cfg.codec.path:
        codec = VaeCodec.from_folder(cfg.codec.path)
    else:  # fine-tuning a released checkpoint: its own `vae.*` weights (spec §9)
        assert cfg.model.init_from is not None  # TrainConfig's validator
        carried = load_checkpoint(cfg.model.init_from).codec
        if not isinstance(carried, VaeCodec):
            raise TrainConfigError(f"codec.path: {cfg.model.init_from} carries no VAE; name a VAE folder")
        codec = carried
    codec = codec.to(device)
    codec.vae.to(dtype)  # frozen; spec §6 runs TE and VAE in half precision
    return codec


def build_text_encoder(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    return TextEncoder.from_pretrained(cfg.text_encoder.path, device=device, dtype=dtype)


def check_compatible(model: XUT, text_encoder: TextEncoder, codec: Codec) -> None:
    mc = model.config
    if text_encoder.hidden_size != mc.ctx_dim:
        raise TrainConfigError(
            f"text_encoder.path: hidden size {text_encoder.hidden_size} != model ctx_dim {mc.ctx_dim}"
        )
    if codec.latent_channels != mc.in_channels:
        raise TrainConfigError(
            f"codec: {codec.kind} gives {codec.latent_channels} channels, model expects {mc.in_channels}"
        )
