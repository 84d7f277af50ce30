"""The [adapter] and [cache] sections of the training config: HDM's recipe defaults, field-named errors."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from hdm_core.adapters.network import AdapterConfig
from hdm_core.train.config import TrainConfigError, config_from_dict, dump_toml

BASE: dict[str, Any] = {
    "model": {"init_from": "base.safetensors"},
    "text_encoder": {"path": "te"},
    "data": {"path": "data"},
    "stages": [{"resolution": 16, "batch_size": 2, "steps": 3}],
    "adapter": {},
}


def test_adapter_section_defaults_are_hdm_recipe_and_match_adapter_config() -> None:
    cfg = config_from_dict(BASE)
    assert cfg.adapter is not None
    assert AdapterConfig.from_dict(cfg.adapter.adapter_config()) == AdapterConfig()
    # Unset optimizer/schedule values take the fine-tuning recipe: lr 0.1 (fan_in scaled), betas 0.9/0.95.
    assert cfg.stages[0].lr == 0.1 and cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.optimizer.lr_scaling == "fan_in" and cfg.schedule.kind == "cosine"
    assert cfg.schedule.warmup_steps == 100
    assert config_from_dict(tomllib.loads(dump_toml(cfg))) == cfg  # what the worker writes reads back equal


def test_explicit_values_win_over_the_recipe() -> None:
    cfg = config_from_dict(
        {
            **BASE,
            "optimizer": {"betas": [0.8, 0.9]},
            "schedule": {"warmup_steps": 0},
            "stages": [{"resolution": 16, "batch_size": 2, "steps": 3, "lr": 0.02}],
            "adapter": {"algorithm": "lora", "rank": 4, "alpha": 2.0, "targets": ["*.mlp.*"]},
        }
    )
    assert cfg.stages[0].lr == 0.02 and cfg.optimizer.betas == (0.8, 0.9) and cfg.schedule.warmup_steps == 0
    ac = AdapterConfig.from_dict(cfg.adapter.adapter_config())  # type: ignore[union-attr]
    assert (ac.algorithm, ac.rank, ac.alpha, ac.targets) == ("lora", 4, 2.0, ("*.mlp.*",))
    # Without [adapter] nothing changes: pretraining's betas, and lr stays required.
    plain = config_from_dict({**BASE, "adapter": None, "stages": [{**BASE["stages"][0], "lr": 0.5}]})
    assert plain.optimizer.betas == (0.9, 0.98) and plain.schedule.warmup_steps == 1000


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"preset": "xut-pixel-debug"}}, r"model\.init_from"),
        ({"adapter": {"factor": 1}}, r"adapter\.factor"),
        ({"adapter": {"rank": 0}}, r"adapter\.rank"),
        ({"adapter": {"alpha": 0}}, r"adapter\.alpha"),
        ({"adapter": {"algorithm": "dora"}}, r"adapter\.algorithm"),
        ({"adapter": {"targets": []}}, r"adapter\.targets"),
        ({"adapter": {"dim": 4}}, r"adapter\.dim: unknown field"),
        ({"cache": {"text_variants": -1}}, r"cache\.text_variants"),
    ],
)
def test_bad_adapter_or_cache_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(TrainConfigError, match=field):
        config_from_dict({**BASE, **change})


def test_cache_dir_resolves_against_base_dir(tmp_path: Any) -> None:
    cfg = config_from_dict({**BASE, "cache": {"latents": True, "dir": "cache"}}, base_dir=tmp_path)
    assert cfg.cache.latents and not cfg.cache.text and cfg.cache.dir == str(tmp_path / "cache")
