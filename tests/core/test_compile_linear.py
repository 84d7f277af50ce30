"""torch.compile'd XUT equals eager; the oneDNN linear equals F.linear (values and gradients); keys unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hdm_core import PRESETS, XUT, load_checkpoint, save_checkpoint
from hdm_core.compile import compile_model
from hdm_core.linear import Linear, cpu_vendor, linear, onednn_available, onednn_linear, use_onednn

SMALL = PRESETS["xut-debug"].replace(depth=1, dec_blocks=1, tread_post=0)


def _model(cfg=SMALL) -> XUT:
    torch.manual_seed(0)
    model = XUT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_compiled_model_equals_eager_on_cpu():
    model = _model()
    net = compile_model(model, "default")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, SMALL.ctx_dim, generator=g)
    t, addon = torch.tensor([0.2, 0.8]), torch.zeros(2)
    with torch.no_grad():
        eager = model(x, t, ctx, addon_info=addon)
        compiled = net(x, t, ctx, addon_info=addon)
        again = net(x * 0.5, t, ctx, addon_info=addon)  # same shape: the warmed graph, new values
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(again, model(x * 0.5, t, ctx, addon_info=addon), atol=1e-4, rtol=1e-4)
    assert compile_model(model, "off") is model
    with pytest.raises(ValueError, match="CUDA"):
        compile_model(model, "reduce-overhead", device="cpu")
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(model, "fast")


def test_onednn_linear_values_and_gradients_equal_f_linear():
    assert onednn_available()  # the CPU build CI installs has it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    up = torch.randn(3, 37, 40, generator=g)
    out = onednn_linear(x, w, b)
    grads = torch.autograd.grad((out * up).sum(), (x, w, b))
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad((ref * up).sum(), (x, w, b))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(onednn_linear(x, w, b), ref, atol=1e-5, rtol=1e-5)
    # `linear` takes it for fp32 activations with enough rows, on AMD CPUs only (MKL is as fast on Intel's).
    assert use_onednn(x, w) == (cpu_vendor() == "AuthenticAMD")
    torch.testing.assert_close(linear(x, w, b), ref, atol=1e-5, rtol=1e-5)
    assert not use_onednn(x.bfloat16(), w.bfloat16())  # other dtypes take F.linear
    assert not use_onednn(x[:, :1], w)  # a few rows (adaLN inputs) too


def test_checkpoint_round_trip_keeps_the_released_key_names(tmp_path):
    model = _model(PRESETS["xut-debug"])
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded = load_checkpoint(path).model
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert "backbone.enc_blocks.0.0.attn.qkv.weight" in model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)
