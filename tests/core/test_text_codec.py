from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from hdm_core import PRESETS, XUT, load_checkpoint, save_checkpoint
from hdm_core.codec import PixelCodec, VaeCodec
from hdm_core.text import TextEncoder


def test_toy_qwen3_folder_loads_through_wrapper(toy_text_encoder):
    te = TextEncoder.from_pretrained(toy_text_encoder)
    assert type(te.model).__name__ == "Qwen3Model"
    assert type(te.tokenizer).__name__.startswith("Qwen2Tokenizer")
    assert te.hidden_size == 64
    out = te.encode(["a red circle", "blue square on the left"])
    n_long = len(te.tokenizer("blue square on the left", add_special_tokens=False)["input_ids"])
    assert out.shape == (2, n_long, 64)  # padded to the longest prompt
    alone = te.encode(["a red circle"])
    # Right padding + causal attention: the real tokens' states do not see the pads.
    torch.testing.assert_close(out[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
    assert te.encode(["a red circle"], padding="max_length", max_length=12).shape == (1, 12, 64)
    assert te.encode([""]).shape == (1, 0, 64)  # empty negative -> length-0 context
    assert te.tokenizer.tokenize("red circle") == ["red", "Ġcircle"]  # toy vocabulary: whole words
    pair = te.encode(["red", "blue"])
    assert (pair[0] - pair[1]).abs().max() > 1e-3


def test_text_encoder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        TextEncoder.from_pretrained(tmp_path)


def _tiny_vae(**extra) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=4,
        **extra,
    )


def test_tiny_autoencoderkl_folder_through_codec(tmp_path):
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 3.0, 0.5, 1.0]
    _tiny_vae(latents_mean=mean, latents_std=std).save_pretrained(tmp_path / "vae")
    codec = VaeCodec.from_folder(tmp_path / "vae")
    assert codec.downsample == 2 and codec.latent_channels == 4
    torch.testing.assert_close(codec.vae_mean.flatten(), torch.tensor(mean))
    z = torch.randn(1, 4, 4, 4)
    img = codec.decode(z)
    assert img.shape == (1, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    # De-normalisation is applied before the decoder: decode(z) == raw decode of z * std + mean.
    raw = codec.vae.decode(
        z * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    ).sample
    torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
    lat = codec.encode(torch.rand(1, 3, 8, 8) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 4, 4)


def test_vae_codec_round_trips_through_single_file_checkpoint(tmp_path):
    _tiny_vae(latents_mean=[0.1] * 4, latents_std=[2.0] * 4).save_pretrained(tmp_path / "vae")
    codec = VaeCodec.from_folder(tmp_path / "vae")
    model = XUT(PRESETS["xut-debug"])
    path = save_checkpoint(tmp_path / "m.safetensors", model, codec=codec)
    loaded = load_checkpoint(path)
    assert isinstance(loaded.codec, VaeCodec)
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(loaded.codec.decode(z), codec.decode(z))


def test_pixel_codec_is_identity_on_range():
    x = torch.linspace(-1, 1, 12).view(1, 3, 2, 2)
    codec = PixelCodec()
    torch.testing.assert_close(codec.decode(codec.encode(x)), x / 2 + 0.5)
