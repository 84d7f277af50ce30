from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hdm_core import PRESETS, XUT, CheckpointError, load_checkpoint, save_checkpoint
from hdm_core.codec import PixelCodec


def _random_model(preset="xut-debug", **changes):
    torch.manual_seed(0)
    model = XUT(PRESETS[preset].replace(**changes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_save_load_round_trip_same_outputs(tmp_path):
    model = _random_model(skip_source="mirrored", ctx_size=7, tread_rate=0.3)
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, codec=PixelCodec() if False else None, metadata={"note": "hello"}
    )
    loaded = load_checkpoint(path)
    assert loaded.config == model.config  # non-shape fields survive through the metadata
    assert loaded.metadata["note"] == "hello"
    assert loaded.codec is None
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, ctx), model(x, t, ctx), atol=0, rtol=0)
    assert all(k.startswith("unet.model.") for k in load_file(path))


def test_pixel_codec_recorded(pixel_checkpoint):
    loaded = load_checkpoint(pixel_checkpoint)
    assert isinstance(loaded.codec, PixelCodec)
    assert loaded.config.in_channels == 3


def test_architecture_inferred_without_metadata(tmp_path):
    model = _random_model()
    save_checkpoint(tmp_path / "m.safetensors", model)
    sd = load_file(tmp_path / "m.safetensors")
    save_file(sd, tmp_path / "bare.safetensors")  # like the released file: no config at all
    loaded = load_checkpoint(tmp_path / "bare.safetensors")
    cfg = model.config
    assert loaded.config.replace(ctx_size=cfg.ctx_size) == cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_cast_on_load(tmp_path, dtype):
    path = save_checkpoint(tmp_path / "m.safetensors", _random_model(), dtype=torch.float16)
    loaded = load_checkpoint(path, dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}


def test_truncated_file_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _random_model())
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_missing_keys_named(tmp_path):
    sd = load_file(save_checkpoint(tmp_path / "m.safetensors", _random_model()))
    del sd["unet.model.backbone.dec_blocks.1.0.xattn.kv.weight"]
    del sd["unet.model.out_patch.proj.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\):.*out_patch\.proj\.bias"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_wrong_shapes_named(tmp_path):
    sd = load_file(save_checkpoint(tmp_path / "m.safetensors", _random_model()))
    sd["unet.model.backbone.enc_blocks.0.0.mlp.w12.bias"] = torch.zeros(7)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped.*enc_blocks\.0\.0\.mlp\.w12\.bias: file \[7\]"):
        load_checkpoint(tmp_path / "shape.safetensors")


def test_unexpected_keys_named(tmp_path):
    sd = load_file(save_checkpoint(tmp_path / "m.safetensors", _random_model()))
    sd["unet.model.final_norm.weight"] = torch.zeros(64)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): final_norm\.weight"):
        load_checkpoint(tmp_path / "extra.safetensors")


def test_not_an_xut_and_missing_file(tmp_path):
    save_file({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no XUT weights"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _random_model())
    first = path.read_bytes()
    model = _random_model()
    with torch.no_grad():
        model.ctx_proj.bias.add_(1)
    save_checkpoint(path, model)
    assert path.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    meta = json.loads(load_checkpoint(path).metadata["hdm_config"])
    assert meta["dim"] == 64
