"""Preset sizes and the xut-base state-dict layout, checked against spec §1.1 and §9 (written from the spec)."""

from __future__ import annotations

import pytest
import torch

from hdm_core import PRESETS, XUT, XUTConfig, count_parameters


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("xut-small", 237_290_128),
        ("xut-base", 343_176_208),
        ("xut-large", 555_628_816),
    ],
)
def test_preset_parameter_counts(name, params):
    assert count_parameters(PRESETS[name]) == params


def _spec_key_table() -> dict[str, list[int]]:
    """Spec §9's table for xut-base, expanded to every key."""
    t = {
        "in_patch.proj.weight": [1024, 4, 2, 2],
        "in_patch.proj.bias": [1024],
        "time_emb.freqs": [1, 512],
        "time_emb.proj.0.weight": [1024, 1024],
        "time_emb.proj.0.bias": [1024],
        "ctx_proj.weight": [1024, 1024],
        "ctx_proj.bias": [1024],
        "addon_info_embs_proj.0.weight": [1024, 1],
        "addon_info_embs_proj.0.bias": [1024],
        "addon_info_embs_proj.2.weight": [1024, 1024],
        "addon_info_embs_proj.2.bias": [1024],
        "out_patch.proj.weight": [16, 1024],
        "out_patch.proj.bias": [16],
    }
    for name in ("attn", "xattn", "ffw"):
        p = f"shared_adaln_{name}."
        t |= {
            p + "0.weight": [1024],
            p + "0.bias": [1024],
            p + "1.weight": [4096, 1024],
            p + "1.bias": [4096],
            p + "3.weight": [3072, 4096],
            p + "3.bias": [3072],
        }
    blocks = ["prev_tread_trns.blocks.0."]
    blocks += [f"backbone.enc_blocks.{i}.0." for i in range(4)]
    blocks += [f"backbone.dec_blocks.{i}.{j}." for i in range(4) for j in range(3)]
    blocks += [f"post_tread_trns.blocks.{j}." for j in range(3)]
    for b in blocks:
        t |= {
            b + "attn_pre_norm.norm.weight": [1024],
            b + "mlp_pre_norm.norm.weight": [1024],
            b + "attn.qkv.weight": [3072, 1024],
            b + "attn.out.weight": [1024, 1024],
            b + "attn.out.bias": [1024],
            b + "attn.rope.freqs": [16, 16, 2],
            b + "mlp.w12.weight": [6144, 1024],
            b + "mlp.w12.bias": [6144],
            b + "mlp.w3.weight": [1024, 3072],
            b + "mlp.w3.bias": [1024],
        }
        if b.startswith("backbone.dec_blocks.") and b.endswith(".0."):
            t |= {
                b + "xattn_pre_norm.norm.weight": [1024],
                b + "xattn.q.weight": [1024, 1024],
                b + "xattn.kv.weight": [2048, 1024],
                b + "xattn.out.weight": [1024, 1024],
                b + "xattn.out.bias": [1024],
                b + "xattn.rope.freqs": [16, 16, 2],
            }
    return t


def test_base_state_dict_matches_spec_key_table():
    with torch.device("meta"):
        model = XUT(PRESETS["xut-base"])
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = _spec_key_table()
    assert len(expected) == 255  # spec §9: 255 tensors
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert actual == expected
    assert sum(1 for k in actual if ".blocks." in k or "_blocks." in k) == 224


def test_debug_presets_fit_on_cpu():
    for name in ("xut-debug", "xut-pixel-debug"):
        assert count_parameters(PRESETS[name]) < 5_000_000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dim", 0),
        ("heads", 3),
        ("head_dim", 6),
        ("tread_rate", 1.0),
        ("skip_source", "symmetric"),
        ("depth", True),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field if field not in {"heads"} else "heads"):
        PRESETS["xut-debug"].replace(**{field: value})


def test_config_dict_round_trip_and_unknown_fields():
    cfg = PRESETS["xut-debug"]
    assert XUTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        XUTConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
