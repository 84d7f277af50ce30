from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from hdm_core import PRESETS, XUT
from hdm_core.codec import VaeCodec
from hdm_core.edit import EditSpec, edit_timesteps, feathered_mask, fit
from hdm_core.pipeline import Camera, HDMPipeline, TreadGuidance
from hdm_core.sampler import SAMPLERS, timesteps

W, H = 32, 24


@pytest.fixture(scope="module")
def pipe(pixel_checkpoint, toy_text_encoder):
    return HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)


def _init(width: int = W, height: int = H) -> Image.Image:
    """A gradient with a filled circle: every channel varies, no pixel saturates the codec's range."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([20 + 200 * x / width, 30 + 180 * y / height, 120 + 0 * x], axis=-1).astype(np.uint8)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).ellipse((4, 4, width // 2, height // 2), fill=(250, 10, 60))
    return img


def _quadrant_mask(width: int = W, height: int = H) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 2, height // 2, width - 1, height - 1), fill=255)
    return mask


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


KW = dict(width=W, height=H, steps=4, guidance_scale=2.0, negative_prompt="low quality")


def test_edit_timesteps_follow_the_schedule_tail():
    ts = timesteps(4)
    torch.testing.assert_close(edit_timesteps(ts, 0.5), torch.tensor([0.5, 0.25, 0.0]))
    assert torch.equal(edit_timesteps(ts, 1.0), ts)
    assert edit_timesteps(ts, 0.0).tolist() == [0.0]  # no step
    for strength in (0.05, 0.3, 0.55, 0.8, 0.99):  # ceil(steps * strength) steps with the uniform schedule
        assert len(edit_timesteps(timesteps(10), strength)) - 1 == int(np.ceil(10 * strength - 1e-9))
    shifted = edit_timesteps(timesteps(8, shift=3.0), 0.6)
    assert shifted[0] == pytest.approx(0.6) and torch.all(shifted[1:] < 0.6) and shifted[-1] == 0


def test_strength_one_is_text_to_image(pipe):
    for sampler in sorted(SAMPLERS):
        t2i = pipe.generate("a red circle", n=2, seed=11, sampler=sampler, **KW)
        i2i = pipe.generate("a red circle", n=2, seed=11, sampler=sampler, edit=EditSpec(_init(), 1.0), **KW)
        assert torch.equal(i2i.latents, t2i.latents)  # 1.0 * eps + 0.0 * x0 == eps, then the same steps
        assert t2i.edit is None and i2i.edit.mode == "img2img" and i2i.edit.steps_run == 4


def test_strength_zero_returns_the_init_image_pixel_codec(pipe):
    init = _init()
    out = pipe.generate("a blue square", seed=3, edit=EditSpec(init, 0.0), **KW)
    # PixelCodec round trip: (x * 2 - 1) / 2 + 0.5 in fp32, rounded back to 8 bits -> the same pixels.
    assert np.array_equal(_arr(out.images[0]), _arr(init))
    assert out.edit.steps_run == 0
    mid = pipe.generate("a blue square", seed=3, edit=EditSpec(init, 0.5), **KW)
    full = pipe.generate("a blue square", seed=3, **KW)
    d_mid = np.abs(_arr(mid.images[0]) - _arr(init)).mean()
    # Partial strength stays closer to the init than text-to-image from the same seed.
    assert 1 < d_mid < np.abs(_arr(full.images[0]) - _arr(init)).mean()


def _tiny_vae_pipe(toy_text_encoder) -> HDMPipeline:
    from hdm_core.text import TextEncoder

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=4,
    )
    codec = VaeCodec(vae, torch.zeros(4), torch.ones(4))
    return HDMPipeline(XUT(PRESETS["xut-debug"]), codec, TextEncoder.from_pretrained(toy_text_encoder))


def test_strength_zero_returns_the_codec_round_trip_vae(toy_text_encoder):
    pipe = _tiny_vae_pipe(toy_text_encoder)
    init = _init()
    out = pipe.generate("x", seed=5, edit=EditSpec(init, 0.0), **KW)
    x = torch.from_numpy(np.asarray(init).copy()).permute(2, 0, 1)[None].float() / 255
    round_trip = pipe.codec.decode(pipe.codec.encode(x * 2 - 1, generator=torch.Generator().manual_seed(0)))
    expected = (round_trip[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().astype(np.int16)
    assert np.abs(_arr(out.images[0]) - expected).max() <= 1  # strength 0 is exactly decode(encode(init))
    # Inpainting keeps unmasked pixels exactly even when the codec cannot reproduce them (an untrained VAE).
    inpaint = pipe.generate("x", seed=5, edit=EditSpec(init, 0.7, _quadrant_mask()), **KW)
    keep = np.asarray(_quadrant_mask()) == 0
    assert np.array_equal(_arr(inpaint.images[0])[keep], _arr(init)[keep])
    assert np.abs(expected - _arr(init)).max() > 10  # the round trip itself is far from exact here


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_inpainting_keeps_unmasked_pixels_and_repaints_masked(pipe, sampler):
    init, mask = _init(), _quadrant_mask()
    out = pipe.generate("a blue square", n=2, seed=21, sampler=sampler, edit=EditSpec(init, 1.0, mask), **KW)
    keep = np.asarray(mask) == 0
    for img in out.images:
        assert np.array_equal(_arr(img)[keep], _arr(init)[keep])
        assert np.abs(_arr(img)[~keep] - _arr(init)[~keep]).mean() > 5
    assert np.abs(_arr(out.images[0])[~keep] - _arr(out.images[1])[~keep]).mean() > 2  # seeds differ
    assert out.edit.mode == "inpaint"
    # The latent itself is pinned to the original outside the mask (pixel space: latent = image in [-1, 1]).
    x0 = torch.from_numpy(np.asarray(init).copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(out.latents[0][:, torch.from_numpy(keep)], x0[:, torch.from_numpy(keep)])


def test_mask_blur_feathers_inward_only(pipe):
    init, mask = _init(), _quadrant_mask()
    m = torch.from_numpy(np.asarray(mask).copy()).float()[None, None] / 255
    alpha = feathered_mask(m, 2.0)
    assert torch.equal(alpha[m == 0], torch.zeros_like(alpha[m == 0]))
    # Border replicated (the corner stays 1); the first masked row is about half.
    assert alpha[0, 0, -1, -1] > 0.99 and 0.3 < alpha[0, 0, H // 2, W - 1] < 0.7
    sharp = pipe.generate("a blue square", seed=4, edit=EditSpec(init, 0.9, mask), **KW).images[0]
    soft_out = pipe.generate("a blue square", seed=4, edit=EditSpec(init, 0.9, mask, mask_blur=2.0), **KW)
    soft = soft_out.images[0]
    keep = np.asarray(mask) == 0
    assert np.array_equal(_arr(soft)[keep], _arr(init)[keep])
    edge = (slice(H // 2, H // 2 + 1), slice(W // 2, W))  # first masked row: blended toward the original
    assert (
        np.abs(_arr(soft)[edge] - _arr(init)[edge]).mean()
        < np.abs(_arr(sharp)[edge] - _arr(init)[edge]).mean()
    )
    assert "Mask blur: 2" in soft_out.edit.parameters_fields()


@pytest.mark.parametrize("tread", [TreadGuidance(), TreadGuidance(cond_rate=0.0, uncond_rate=0.5)])
def test_image_i_of_an_edit_batch_equals_a_batch_of_one(pipe, tread):
    spec = EditSpec(_init(), 0.8, _quadrant_mask(), mask_blur=1.0)
    batch = pipe.generate("a red circle", n=3, seed=100, tread=tread, edit=spec, **KW)
    alone = pipe.generate("a red circle", n=1, seed=102, tread=tread, edit=spec, **KW)
    torch.testing.assert_close(batch.latents[2:], alone.latents, atol=1e-5, rtol=1e-5)
    assert np.abs(_arr(batch.images[2]) - _arr(alone.images[0])).max() <= 1


def test_heun_camera_tread_guidance_with_editing(pipe):
    spec = EditSpec(_init(), 0.75, _quadrant_mask())
    kw = dict(KW, sampler="heun", tread=TreadGuidance(cond_rate=0.0, uncond_rate=0.5), seed=9, edit=spec)
    seen: list[tuple[int, int]] = []
    base = pipe.generate("a red circle", callback=lambda i, n: seen.append((i, n)), **kw)
    assert seen == [(1, 3), (2, 3), (3, 3)] and base.edit.steps_run == 3
    moved = pipe.generate("a red circle", camera=Camera(x_shift=0.5, zoom=1.5), **kw)
    assert (moved.latents - base.latents).abs().max() > 1e-3
    keep = np.asarray(_quadrant_mask()) == 0
    for out in (base, moved):
        assert np.array_equal(_arr(out.images[0])[keep], _arr(_init())[keep])
    again = pipe.generate("a red circle", **kw)
    assert torch.equal(again.latents, base.latents)


def test_init_image_of_another_size_is_fitted_by_cover_and_centre_crop(pipe):
    wide = _init(64, 24)  # 2.67:1 -> scaled by 1 (height already fits), centre 32 columns kept
    assert np.array_equal(np.asarray(fit(wide, W, H, Image.Resampling.LANCZOS)), np.asarray(wide)[:, 16:48])
    small = fit(_init(16, 12), W, H, Image.Resampling.LANCZOS)
    assert small.size == (W, H)
    out = pipe.generate("x", seed=1, edit=EditSpec(wide, 0.0), **KW)
    assert np.array_equal(_arr(out.images[0]), _arr(wide)[:, 16:48])


def test_edit_spec_validation():
    with pytest.raises(ValueError, match="strength"):
        EditSpec(_init(), 1.5)
    with pytest.raises(ValueError, match="strength"):
        EditSpec(_init(), float("nan"))
    with pytest.raises(ValueError, match="mask size"):
        EditSpec(_init(), 0.5, _quadrant_mask(16, 16))
    with pytest.raises(ValueError, match="mask_blur"):
        EditSpec(_init(), 0.5, _quadrant_mask(), mask_blur=-1)
    fields = EditSpec(_init(), 0.5).mode, EditSpec(_init(), 0.5, _quadrant_mask()).mode
    assert fields == ("img2img", "inpaint")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_project_runs_after_every_step_at_the_step_end_time(name):
    seen: list[float] = []

    def project(x, t):
        seen.append(float(t))
        return x * 0 + 7.0

    ts = edit_timesteps(timesteps(4), 0.6)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = SAMPLERS[name](lambda x, t: x, torch.ones(2, 3), ts, project=project, generators=gens)
    assert seen == pytest.approx([0.5, 0.25, 0.0]) and torch.equal(out, torch.full((2, 3), 7.0))
