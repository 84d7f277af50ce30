from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules import LokrModule, NormModule
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hdm_core import PRESETS, XUT, load_checkpoint, save_checkpoint
from hdm_core.adapters.apply import apply_adapters, merge_adapters
from hdm_core.adapters.files import AdapterInfo, file_sha256, load_adapter, save_adapter
from hdm_core.adapters.network import AdapterConfig, AdapterError, adapter_parameter_count, attach
from hdm_core.pipeline import sample_latents
from hdm_core.sampler import Conditioning

INFO = AdapterInfo(
    base_model="debug-base",
    base_sha256="ab" * 32,
    steps=12,
    trigger_words=("orange",),
    caption_sample="an orange circle",
)
VARIANTS = {
    "lokr-recipe": AdapterConfig(),
    "lokr-lowrank": AdapterConfig(algorithm="lokr", full_matrix=False, rank=4, alpha=1.0, factor=8),
    "lora": AdapterConfig(algorithm="lora", rank=4, alpha=2.0),
    "loha": AdapterConfig(algorithm="loha", rank=4, alpha=1.0, train_norm=False),
}


def _model(preset: str = "xut-debug", seed: int = 0) -> XUT:
    torch.manual_seed(seed)
    model = XUT(PRESETS[preset])
    with torch.no_grad():  # zero-initialised output layers would hide every change
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _inputs(model: XUT, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([0.3, 0.8]), torch.randn(2, 5, cfg.ctx_dim, generator=g)


def _sample(model: XUT, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, model.config.in_channels, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 5, model.config.ctx_dim, generator=g))
    uncond = Conditioning(torch.zeros(1, 5, model.config.ctx_dim))
    return sample_latents(model, noise, cond, uncond, steps=3, guidance_scale=2.0)


def _random_adapter(model: XUT, cfg: AdapterConfig, path, seed: int, std: float = 0.05):
    """A file as training writes it, with clearly non-zero factors (a fresh LoKr/LoRA has delta 0)."""
    net = attach(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * std)
    save_adapter(net, path, INFO)
    net.detach()
    return load_adapter(path)


def test_defaults_are_hdm_recipe_and_bad_values_are_named():
    cfg = AdapterConfig()
    assert (cfg.algorithm, cfg.factor, cfg.full_matrix, cfg.train_norm) == ("lokr", 4, True, True)
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for field, value in [
        ("algorithm", "dora"),
        ("rank", 0),
        ("alpha", float("nan")),
        ("factor", 1),
        ("targets", "*.mlp.*"),
        ("train_norm", "yes"),
    ]:
        with pytest.raises(ValueError, match=f"AdapterConfig.{field}"):
            AdapterConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown field"):
        AdapterConfig.from_dict({"rnak": 4})
    with pytest.raises(AdapterError, match="match no Linear"):
        attach(_model(), AdapterConfig(targets=("nothing.here",)))


@pytest.mark.parametrize("train_norm", [True, False])
def test_training_changes_the_output_only_through_adapter_params(train_norm):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        base_out = model(x, t, ctx)
    net = attach(model, AdapterConfig(train_norm=train_norm))
    kinds = {type(m) for m in net.network.loras}
    assert kinds == ({LokrModule, NormModule} if train_norm else {LokrModule})
    assert adapter_parameter_count(model.config, net.config) == sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95))
    target = torch.randn_like(x)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x, t, ctx, tread_rate=0.0) - target).square().mean()
        loss.backward()
        opt.step()
    model.eval()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    named = dict(net.network.named_parameters())
    assert named and all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    assert any(k.endswith(".w_norm") for k in named) == train_norm
    with torch.no_grad():
        adapted = model(x, t, ctx)
    assert (adapted - base_out).abs().max() > 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    net.detach()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), base_out)


def test_save_load_round_trip_keeps_metadata_and_library_layout(tmp_path):
    model = _model()
    adapter = _random_adapter(model, AdapterConfig(), tmp_path / "a.safetensors", seed=5)
    assert adapter.info == INFO and adapter.config == AdapterConfig() and adapter.base == model.config
    assert (
        adapter.metadata["hdm_adapter_algorithm"] == "lokr" and adapter.metadata["hdm_training_steps"] == "12"
    )
    assert adapter.name == "a"
    assert all(re.match(r"^lycoris_[a-z0-9_]+\.(lokr_w1|lokr_w2|alpha|w_norm)$", k) for k in adapter.tensors)
    assert "lycoris_backbone_dec_blocks_0_0_xattn_kv.lokr_w2" in adapter.tensors
    # The library's own loader reads the file and rebuilds the same LoKr modules from shapes alone (its loader
    # cannot rebuild norm modules for torch's RMSNorm by itself, so those keys are left out here).
    lokr_only = {
        k: v for k, v in load_file(str(tmp_path / "a.safetensors")).items() if not k.endswith(".w_norm")
    }
    lib_net, _ = create_lycoris_from_weights(1.0, None, copy.deepcopy(model), weights_sd=lokr_only)
    assert sum(isinstance(m, LokrModule) for m in lib_net.loras) == sum(
        k.endswith(".lokr_w2") for k in adapter.tensors
    )
    # Loading the tensors back into a fresh network gives the same function.
    x, t, ctx = _inputs(model)
    net = attach(model, AdapterConfig())
    net.load_state_dict(adapter.tensors)
    with torch.no_grad():
        hooked = model(x, t, ctx)
    net.detach()
    with apply_adapters(model, [(adapter, 1.0)]), torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), hooked, atol=1e-5, rtol=1e-5)


def _rewrite(src, dst, *, meta=None, drop_meta=None, tensors=None):
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    data = load_file(str(src))
    metadata.update(meta or {})
    for key in drop_meta or ():
        metadata.pop(key)
    data.update(tensors or {})
    save_file(data, str(dst), metadata)
    return dst


def test_bad_files_are_refused_naming_the_problem(tmp_path):
    good = tmp_path / "good.safetensors"
    _random_adapter(_model(), AdapterConfig(), good, seed=1)
    key = next(iter(load_file(str(good))))
    cases = [
        (dict(drop_meta=["hdm_base_sha256"]), "lacks \\['hdm_base_sha256'\\]"),
        (dict(meta={"format": "kohya"}), "metadata format"),
        (dict(meta={"hdm_adapter_config": '{"algorithm": "lokr", "rank": -1}'}), "AdapterConfig.rank"),
        (dict(meta={"hdm_adapter_algorithm": "loha"}), "hdm_adapter_algorithm 'loha'"),
        (dict(meta={"hdm_training_steps": "many"}), "hdm_training_steps"),
        (dict(meta={"hdm_base_config": "{not json"}), "hdm_base_config is not valid JSON"),
        (dict(tensors={"unet.model.x": torch.zeros(1)}), "'unet.model.x' is not a LyCORIS lokr key"),
        (dict(tensors={key: torch.full_like(load_file(str(good))[key], float("nan"))}), "NaN"),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(AdapterError, match=message):
            load_adapter(_rewrite(good, tmp_path / f"bad{i}.safetensors", **change))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(truncated)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_weighted_adapters_equal_the_library_forward(tmp_path, variant):
    """apply_adapters merges sum w_i dW_i; the reference is the library's own unmerged forward wrappers, stacked,
    each at its multiplier (here 0.7 and a negative -0.5)."""
    cfg = VARIANTS[variant]
    model = _model()
    std = 0.3 if cfg.algorithm == "loha" else 0.05  # a Hadamard product of two low-rank products is small
    a = _random_adapter(model, cfg, tmp_path / "a.safetensors", seed=11, std=std)
    b = _random_adapter(model, cfg, tmp_path / "b.safetensors", seed=12, std=std)
    x, t, ctx = _inputs(model)
    nets = []
    for adapter, weight in ((a, 0.7), (b, -0.5)):
        net = attach(model, cfg)
        net.load_state_dict(adapter.tensors)
        net.network.set_multiplier(weight)
        nets.append(net)
    with torch.no_grad():
        reference = model(x, t, ctx)
        for net in reversed(nets):
            net.detach()
        base = model(x, t, ctx)
    assert (reference - base).abs().max() > 1e-3
    with apply_adapters(model, [(a, 0.7), (b, -0.5)]) as applied, torch.no_grad():
        assert applied.adapters == (("a", 0.7), ("b", -0.5))
        torch.testing.assert_close(model(x, t, ctx), reference, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_after_a_nonzero_weight_and_weight_zero_are_bit_identical(tmp_path, dtype):
    """Weight 0 merges nothing (by design), so what can go wrong is the way back: after adapters were merged at
    non-zero weights, restoring them (or switching to weight 0) must give the base's bits, not base + d - d."""
    model = _model()
    a = _random_adapter(model, AdapterConfig(), tmp_path / "a.safetensors", seed=21)
    b = _random_adapter(model, VARIANTS["lora"], tmp_path / "b.safetensors", seed=22)
    model.to(dtype)
    fresh = copy.deepcopy(model)
    base_latents = _sample(fresh)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    for weights in ((1.0, -1.5), (0.7, 0.0), (-2.0, 3.0)):
        applied = apply_adapters(model, [(a, weights[0]), (b, weights[1])])
        assert set(applied.originals) and (_sample(model) - base_latents).abs().max() > 1e-3, weights
        applied.restore()
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
        assert changed == [], (weights, changed[:5])
        assert torch.equal(_sample(model), base_latents), weights  # no adapters == a fresh worker's image
        zero = apply_adapters(model, [(a, 0.0), (b, 0.0)])  # weight 0 right after a non-zero merge
        assert zero.originals == {} and torch.equal(_sample(model), base_latents), weights


def test_bad_weight_leaves_the_model_unchanged(tmp_path):
    model = _model()
    a = _random_adapter(model, AdapterConfig(), tmp_path / "a.safetensors", seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"adapters\[1\].weight"):
        apply_adapters(model, [(a, 1.0), (a, float("inf"))])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_merged_checkpoint_gives_base_plus_adapter(tmp_path):
    model = _model()
    adapter = _random_adapter(model, AdapterConfig(), tmp_path / "a.safetensors", seed=31)
    base_latents = _sample(model)
    net = attach(model, AdapterConfig())
    net.load_state_dict(adapter.tensors)
    hooked_latents = _sample(model)  # base + adapter through the library's forward at weight 1
    net.detach()
    merged = merge_adapters(model, [(adapter, 1.0)])
    assert torch.equal(_sample(model), base_latents)  # the input model is untouched
    path = save_checkpoint(tmp_path / "merged.safetensors", merged)
    reloaded = load_checkpoint(path).model
    merged_latents = _sample(reloaded)
    assert (merged_latents - base_latents).abs().max() > 1e-3
    torch.testing.assert_close(merged_latents, hooked_latents, atol=1e-4, rtol=0)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    adapter = _random_adapter(_model("xut-debug"), AdapterConfig(), tmp_path / "a.safetensors", seed=41)
    other = _model("xut-pixel-debug")
    with pytest.raises(
        AdapterError, match=r"different XUT architecture: in_channels 4 \(adapter\) vs 3 \(model\)"
    ):
        apply_adapters(other, [(adapter, 1.0)])
    deeper = _model("xut-debug")
    deeper_cfg = deeper.config.replace(tread_post=2)
    with pytest.raises(AdapterError, match=r"tread_post 1 \(adapter\) vs 2 \(model\)"):
        apply_adapters(XUT(deeper_cfg), [(adapter, 1.0)])
    # Same architecture, but the file lacks a layer the config asks for.
    key = "lycoris_backbone_dec_blocks_0_0_xattn_kv.lokr_w2"
    tensors = {k: v for k, v in adapter.tensors.items() if k != key}
    with pytest.raises(AdapterError, match="1 missing key"):
        apply_adapters(_model(), [(dataclasses.replace(adapter, tensors=tensors), 1.0)])


@pytest.mark.parametrize("preset", ["xut-debug", "xut-pixel-debug"])
def test_default_adapter_file_is_under_5_percent_of_the_base(tmp_path, preset):
    model = _model(preset)
    adapter = tmp_path / "a.safetensors"
    _random_adapter(model, AdapterConfig(), adapter, seed=0)
    base = save_checkpoint(tmp_path / "base.safetensors", model)
    ratio = adapter.stat().st_size / base.stat().st_size
    assert ratio < 0.05, f"{preset}: adapter is {ratio:.2%} of the base checkpoint"
    assert len(file_sha256(base)) == 64
