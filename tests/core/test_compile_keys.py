"""torch.compile'd XUT equals eager; every linear is a plain nn.Linear (one kernel whatever the CPU); keys unchanged."""

from __future__ import annotations

import pytest
import torch

from hdm_core import PRESETS, XUT, load_checkpoint, save_checkpoint
from hdm_core.compile import compile_model

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


def test_checkpoint_round_trip_keeps_the_released_key_names(tmp_path):
    model = _model(PRESETS["xut-debug"])
    # F.linear on every CPU: no kernel chosen by vendor, so a run resumed on the same machine takes the same path.
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded = load_checkpoint(path).model
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert "backbone.enc_blocks.0.0.attn.qkv.weight" in model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)
