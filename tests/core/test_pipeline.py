from __future__ import annotations

import numpy as np
import pytest
import torch

from hdm_core.pipeline import Camera, HDMPipeline, TreadGuidance
from hdm_core.sampler import SamplingCancelled


@pytest.fixture(scope="module")
def pipe(pixel_checkpoint, toy_text_encoder):
    return HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)


def _arr(img):
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize("tread", [TreadGuidance(), TreadGuidance(cond_rate=0.0, uncond_rate=0.5)])
def test_image_i_of_a_batch_equals_a_batch_of_one(pipe, tread):
    kw = dict(width=32, height=16, steps=3, guidance_scale=2.0, tread=tread, negative_prompt="low quality")
    batch = pipe.generate("a red circle", n=3, seed=100, **kw)
    assert batch.seeds == [100, 101, 102]
    alone = pipe.generate("a red circle", n=1, seed=102, **kw)
    assert alone.seeds == [102]
    torch.testing.assert_close(batch.latents[2:], alone.latents, atol=1e-5, rtol=1e-5)
    assert np.abs(_arr(batch.images[2]) - _arr(alone.images[0])).max() <= 1
    assert np.abs(_arr(batch.images[0]) - _arr(batch.images[1])).max() > 10  # different seeds differ


def test_outputs_depend_on_prompt_camera_and_guidance(pipe):
    kw = dict(width=16, height=16, steps=2, seed=7)
    base = pipe.generate("a red circle", **kw).latents
    assert (pipe.generate("a blue square", **kw).latents - base).abs().max() > 1e-4
    assert (pipe.generate("a red circle", camera=Camera(x_shift=0.5), **kw).latents - base).abs().max() > 1e-4
    assert (pipe.generate("a red circle", guidance_scale=1.0, **kw).latents - base).abs().max() > 1e-4
    again = pipe.generate("a red circle", **kw).latents
    torch.testing.assert_close(again, base, atol=0, rtol=0)


def test_image_format_and_sizes(pipe):
    out = pipe.generate(["a", "b"], n=2, width=48, height=32, steps=1, seed=0)
    assert len(out.images) == 4 and out.images[0].size == (48, 32) and out.images[0].mode == "RGB"
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.generate("x", width=33, height=32, steps=1)


def test_callback_progress_and_cancel(pipe):
    steps = []
    pipe.generate(
        "x", width=16, height=16, steps=4, seed=1, sampler="heun", callback=lambda i, n: steps.append((i, n))
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def cancel(i, n):
        raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        pipe.generate("x", width=16, height=16, steps=50, callback=cancel)


def test_bf16_runs(pixel_checkpoint, toy_text_encoder):
    pipe = HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder, dtype=torch.bfloat16)
    out = pipe.generate("a red circle", width=16, height=16, steps=2, seed=3)
    fp32 = HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder).generate(
        "a red circle", width=16, height=16, steps=2, seed=3
    )
    # Everything bf16 except the frequency tensors, which precision.cast_model keeps fp32 (rounded they move phases).
    dtypes: dict[bool, set] = {}
    for n, p in pipe.model.named_parameters():
        dtypes.setdefault(n.endswith("freqs"), set()).add(p.dtype)
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    assert (out.latents - fp32.latents).abs().mean() < 0.05  # bf16 rounding, not a different computation


def test_models_trained_here_are_prompted_with_their_training_caption_length(
    pixel_checkpoint, toy_text_encoder, tmp_path
):
    """A checkpoint recording its training caption length pads prompt and negative to it (the unconditional branch
    is then the trained empty caption); one without it keeps the reference's padding."""
    from hdm_core.checkpoint import TEXT_LENGTH_KEY, CheckpointError, load_checkpoint, save_checkpoint
    from hdm_core.codec import PixelCodec

    loaded = load_checkpoint(pixel_checkpoint)
    trained = save_checkpoint(
        tmp_path / "t.safetensors", loaded.model, codec=PixelCodec(), metadata={TEXT_LENGTH_KEY: "16"}
    )
    reference = HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)
    padded = HDMPipeline.from_paths(trained, toy_text_encoder)
    assert reference.text_length is None and padded.text_length == 16
    seen: list[int] = []
    encode = padded.text_encoder.encode
    padded.text_encoder.encode = lambda prompts, **kw: (
        seen.append(kw.get("max_length")) or encode(prompts, **kw)
    )
    kw = dict(width=16, height=16, steps=2, guidance_scale=3.0, seed=5)
    out = padded.generate("a red circle", **kw).latents
    assert seen == [16, 16]  # prompt and negative
    manual = HDMPipeline(loaded.model, PixelCodec(), reference.text_encoder, text_length=16)
    torch.testing.assert_close(out, manual.generate("a red circle", **kw).latents)
    assert (out - reference.generate("a red circle", **kw).latents).abs().max() > 1e-4
    bad = save_checkpoint(
        tmp_path / "b.safetensors", loaded.model, codec=PixelCodec(), metadata={TEXT_LENGTH_KEY: "x"}
    )
    with pytest.raises(CheckpointError, match=TEXT_LENGTH_KEY):
        HDMPipeline.from_paths(bad, toy_text_encoder)
