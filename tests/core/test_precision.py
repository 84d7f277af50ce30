"""The dtype setting, and every reduced-precision path against fp32 on CPU (so a dtype bug shows without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hdm_core import PRESETS, XUT
from hdm_core.pipeline import HDMPipeline, sample_latents
from hdm_core.precision import cast_model, default_train_precision, resolve_dtype
from hdm_core.rope import position_map
from hdm_core.sampler import Conditioning

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4 %); errors of a few steps through a 2-stage XUT stay within
# a few percent of the output's scale. fp32 vs fp32 agrees to ~1e-6, so a dtype bug (wrong cast, fp32-only op,
# a bf16 reduction) shows as a much larger error.
BF16_FWD_REL = 4e-2
BF16_SAMPLE_REL = 5e-2


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("BF16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype(torch.int8, "cpu")
    assert default_train_precision("cuda") == "bf16" and default_train_precision("cpu") == "fp32"


def _model() -> XUT:
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-debug"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the zero-initialised output layers need values
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_forward_and_sampling_track_fp32(dtype):
    fp32 = _model()
    low = cast_model(_model(), dtype)
    assert low.time_emb.freqs.dtype == low.backbone.enc_blocks[0][0].attn.rope.freqs.dtype == torch.float32
    cfg = fp32.config
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, cfg.ctx_dim, generator=g)
    t, addon = torch.tensor([0.3, 0.9]), torch.tensor([0.0, 0.4])
    with torch.no_grad():
        ref = fp32(x, t, ctx, addon_info=addon)
        out = low(x.to(dtype), t, ctx.to(dtype), addon_info=addon)
    assert out.dtype == dtype
    assert _rel(out, ref) < BF16_FWD_REL
    assert _rel(out, ref) > 1e-6  # it really ran in reduced precision

    pos = position_map(16, 16)[None].expand(2, -1, -1)
    cond, uncond = (
        Conditioning(ctx, pos, addon),
        Conditioning(torch.randn(2, 8, cfg.ctx_dim, generator=g), pos, addon),
    )
    low_c = Conditioning(cond.ctx.to(dtype), pos, addon)
    low_u = Conditioning(uncond.ctx.to(dtype), pos, addon)
    kw = dict(steps=4, guidance_scale=3.0)
    ref_lat = sample_latents(fp32, x, cond, uncond, **kw)
    lat = sample_latents(low, x, low_c, low_u, **kw)
    assert lat.dtype == torch.float32  # the ODE state stays fp32
    assert _rel(lat, ref_lat) < BF16_SAMPLE_REL


def test_bf16_training_step_under_autocast_tracks_fp32():
    """The trainer's CUDA default is bf16 autocast over fp32 weights; CPU autocast runs the same code path."""
    from hdm_core.flow import flow_loss

    model = _model().train()
    g = torch.Generator().manual_seed(3)
    x0, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, model.config.ctx_dim, generator=g)
    noise, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.2, 0.7])
    grads = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = flow_loss(model, x0, ctx, noise=noise, t=t, tread_rate=0.0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _rel(grads[1], grads[0]) < 0.1
    assert _rel(grads[1], grads[0]) > 1e-6


def test_pipeline_dtype_setting(pixel_checkpoint, toy_text_encoder):
    fp32 = HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder, dtype="auto")
    assert fp32.dtype == torch.float32 and next(fp32.model.parameters()).dtype == torch.float32
    bf16 = HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder, dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    kw = dict(width=16, height=16, steps=3, seed=5, guidance_scale=2.0)
    a, b = fp32.generate("a red circle", **kw), bf16.generate("a red circle", **kw)
    assert _rel(b.latents, a.latents) < BF16_SAMPLE_REL
    assert b.images[0].size == (16, 16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder, dtype="fp64")


def test_train_precision_auto_and_service_dtype_choices():
    from typing import get_args

    from app.settings import DTYPES
    from hdm_core.precision import DTypeSetting, train_precision
    from hdm_core.train.config import Precision

    assert train_precision("auto", "cuda") == "bf16" and train_precision("auto", "cpu") == "fp32"
    assert train_precision("fp16", "cpu") == "fp16"
    # one set of names: HDM_DTYPE (torch-free settings), HDMPipeline(dtype=...) and [train] precision
    assert DTYPES == get_args(DTypeSetting) == get_args(Precision)
