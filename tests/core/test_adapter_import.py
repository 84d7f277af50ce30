"""Adapter files made elsewhere (hdm_core.adapters.imports): LyCORIS networks built the way HDM's trainer builds them,
kohya- and peft-named LoRAs, `.pt` files; each converted file applied by this service computes what the library's
own hooked forward computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hdm_core import PRESETS, XUT, save_checkpoint
from hdm_core.adapters import pickled
from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.errors import AdapterError
from hdm_core.adapters.files import load_adapter
from hdm_core.adapters.imports import Base, convert
from tests.adapter_files import evil_pickle, foreign_network, inputs, kohya_names, peft_names


def base_model(seed: int = 0) -> XUT:
    torch.manual_seed(seed)
    model = XUT(PRESETS["xut-debug"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Base, XUT]:
    model = base_model()
    path = save_checkpoint(tmp_path_factory.mktemp("base") / "base.safetensors", model)
    return Base.from_checkpoint("base", "cd" * 32, model.config.to_dict(), path), model


def applied_output(base: tuple[Base, XUT], src: Path, tmp_path: Path) -> torch.Tensor:
    info, model = base
    dst = tmp_path / "converted.safetensors"
    convert(src, dst, info)
    adapter = load_adapter(dst)
    x, t, ctx = inputs(model)
    with apply_adapters(model, [(adapter, 1.0)]), torch.no_grad():
        return model(x, t, ctx)


@pytest.mark.parametrize("recipe", ["lokr", "loha", "lora"])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_lycoris_file_from_wrapper_matches_library_forward(base, tmp_path, recipe, container):
    model = base[1]
    with torch.no_grad():
        plain = model(*inputs(model))
    state, hooked = foreign_network(model, recipe)
    assert all(k.startswith("lycoris_model_") for k in state)
    if recipe == "lokr":
        assert any(k.endswith(".w_norm") for k in state), "train_norm trains the LayerNorms"
    src = tmp_path / f"adapter.{container}"
    if container == "pt":
        torch.save(state, src)
        pickled.to_safetensors(src, tmp_path / "plain.safetensors")
        src = tmp_path / "plain.safetensors"
    else:
        save_file(state, str(src))
    out = applied_output(base, src, tmp_path)
    assert (hooked - plain).abs().max() > 1e-3
    assert (out - hooked).abs().max() <= 1e-4


def test_kohya_named_lora(base, tmp_path):
    state, hooked = foreign_network(base[1], "lora")
    save_file(kohya_names(state), str(tmp_path / "k.safetensors"))
    assert (applied_output(base, tmp_path / "k.safetensors", tmp_path) - hooked).abs().max() <= 1e-4


def test_peft_named_lora(base, tmp_path):
    # peft keeps lora_alpha in adapter_config.json, not among the tensors; the service then scales by 1, which is
    # what a LoRA with alpha == rank computes
    state, hooked = foreign_network(base[1], "lora-alpha-rank")
    peft = {k: v for k, v in peft_names(state, base[1]).items() if not k.endswith(".alpha")}
    assert any(k.startswith("base_model.model.") and k.endswith(".lora_A.weight") for k in peft)
    save_file(peft, str(tmp_path / "p.safetensors"))
    assert (applied_output(base, tmp_path / "p.safetensors", tmp_path) - hooked).abs().max() <= 1e-4


def test_shapes_of_another_architecture_are_named(base, tmp_path):
    state, _ = foreign_network(base[1], "lora")
    key = next(k for k in state if k.endswith("attn_qkv.lora_up.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 8, state[key].shape[1])
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError, match=r"do not fit the base model's shapes: .*attn\.qkv"):
        convert(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", base[0])
    assert not (tmp_path / "out.safetensors").exists()


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    src = evil_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(AdapterError, match=r"weights_only=True"):
        pickled.to_safetensors(src, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_lycoris_own_loader_reads_our_files_and_trained_rmsnorms_need_norm(tmp_path):
    """What docs/training.md says of other loaders: LyCORIS' `create_lycoris_from_weights` on the XUT reads a file
    this service writes (HDM's recipe, RMSNorms trained) only when each RMSNorm exposes `_norm` (the LLaMA
    convention; torch's RMSNorm has none, and the library's NormModule then builds no `w_norm` to load into)."""
    import copy

    from lycoris import create_lycoris_from_weights

    from hdm_core.adapters.files import AdapterInfo, save_adapter
    from hdm_core.adapters.network import AdapterConfig, attach, lend_norms

    model = base_model()
    net = attach(model, AdapterConfig())
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_adapter(net, tmp_path / "ours.safetensors", AdapterInfo("base", "ab" * 32, 1))
    net.detach()
    assert any(
        ".w_norm" in k and "_pre_norm_norm" in k for k in load_adapter(tmp_path / "ours.safetensors").tensors
    )
    fresh = copy.deepcopy(model)
    with pytest.raises(AttributeError, match="w_norm"):
        create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), fresh)
    with lend_norms(fresh):
        lib, _ = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), fresh)
    lib.apply_to()
    x, t, ctx = inputs(model)
    with torch.no_grad():
        hooked = fresh(x, t, ctx)
    with apply_adapters(model, [(load_adapter(tmp_path / "ours.safetensors"), 1.0)]), torch.no_grad():
        assert (model(x, t, ctx) - hooked).abs().max() <= 1e-4


def test_full_diff_module_file(base, tmp_path):
    """LyCORIS `full` (diff) modules: `diff` / `diff_b` are the weight changes themselves. (The library's hooked
    forward of `full` cannot run on XUT, which reads a Linear's `.weight` that the hook takes away, so the expected
    model is the base with the diffs added by hand.)"""
    model = base[1]
    layers = ["backbone.enc_blocks.0.0.attn.qkv", "backbone.dec_blocks.0.0.mlp.w3"]
    modules = dict(model.named_modules())
    torch.manual_seed(9)
    tensors, expected = {}, base_model()
    for path in layers:
        layer = modules[path]
        key = "lycoris_model_" + path.replace(".", "_")
        tensors[f"{key}.diff"] = torch.randn_like(layer.weight) * 0.05
        if layer.bias is not None:
            tensors[f"{key}.diff_b"] = torch.randn_like(layer.bias) * 0.05
    with torch.no_grad():
        for path in layers:
            target = dict(expected.named_modules())[path]
            key = "lycoris_model_" + path.replace(".", "_")
            target.weight.add_(tensors[f"{key}.diff"])
            if target.bias is not None:
                target.bias.add_(tensors[f"{key}.diff_b"])
        want = expected(*inputs(expected))
    save_file(tensors, str(tmp_path / "full.safetensors"))
    out = applied_output(base, tmp_path / "full.safetensors", tmp_path)
    with torch.no_grad():
        plain = model(*inputs(model))
    assert (want - plain).abs().max() > 1e-3
    assert (out - want).abs().max() <= 1e-4
