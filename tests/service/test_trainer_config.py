"""The TOML config the worker writes for hdm_core.train, parsed back by the trainer's own loader (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas import TrainRequest
from app.settings import get_settings
from hdm_core.train.config import dump_toml, load_config
from worker.train_config import trainer_config


def _request(**kw: object) -> dict:
    body = {
        "name": "t",
        "arch": "xut-pixel-debug",
        "dataset": "ds_x",
        "precision": "fp32",
        "stages": [{"resolution": 16, "steps": 2, "batch_size": 2, "lr": 1e-3}],
        **kw,
    }
    req = TrainRequest.model_validate(body).model_dump(mode="json")
    return {**req, "dataset_path": "/nonexistent/data", "base_model_path": None}


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    def apply(**env: str | None):  # type: ignore[no-untyped-def]
        monkeypatch.setenv("HDM_TEXT_ENCODER", str(tmp_path / "te"))
        for k, v in env.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        return get_settings()

    yield apply
    get_settings.cache_clear()


def _load(cfg: dict, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    return load_config(path)


def test_text_max_length_reaches_the_trainer(settings_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings_env()
    assert _load(trainer_config(_request(text_max_length=32), None), tmp_path).text_encoder.max_length == 32
    # default stays the spec's 256
    assert _load(trainer_config(_request(), None), tmp_path).text_encoder.max_length == 256
    assert TrainRequest.model_json_schema()["properties"]["text_max_length"]["maximum"] == 1024


def test_cpu_threads_setting_reaches_the_trainer(settings_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings_env()
    cfg = trainer_config(_request(), None)
    assert "num_threads" not in cfg["train"]
    assert _load(cfg, tmp_path).train.num_threads == 0
    settings_env(HDM_CPU_THREADS="2")
    assert _load(trainer_config(_request(), None), tmp_path).train.num_threads == 2


def test_latent_training_gets_the_server_vae(settings_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vae = tmp_path / "vae"
    settings_env(HDM_VAE=str(vae))
    cfg = trainer_config(_request(arch="xut-debug"), None)
    assert cfg["codec"] == {"kind": "vae", "path": str(vae)}
    parsed = _load(cfg, tmp_path)
    assert parsed.codec.kind == "vae" and parsed.codec.path == str(vae)
    assert trainer_config(_request(), None)["codec"] == {"kind": "pixel"}  # pixel arch: no VAE
    # fine-tuning: a base that carries its VAE keeps it; one saved without a codec ("none") uses HDM_VAE
    base = {**_request(), "arch": None, "base_model": "b", "base_model_path": "/models/b.safetensors"}
    assert trainer_config(base, "vae")["codec"] == {"kind": "vae"}
    assert trainer_config(base, "none")["codec"] == {"kind": "vae", "path": str(vae)}
    assert trainer_config(base, "pixel")["codec"] == {"kind": "pixel"}


def test_trainer_env_one_rule_for_every_layout(settings_env) -> None:  # type: ignore[no-untyped-def]
    from worker.train_config import trainer_env

    base = {"PATH": "/bin"}
    settings_env(HDM_DEVICE="cpu", HDM_SLOTS="0,1", HDM_GPU_INDEX="0")  # CPU slots (tests): nothing to pin
    assert trainer_env([0, 1], base) == base
    # the compose trainer service: all GPUs visible, the leased slots' local indices
    settings_env(
        HDM_DEVICE="cuda",
        HDM_SLOTS="0,1,2,3,4,5,6,7",
        HDM_SLOT_GROUPS="0,1,2,3;4,5,6,7",
        HDM_LOCAL_SLOTS="4,5,6,7",
        HDM_GPU_INDEX=None,
    )
    assert trainer_env([5, 7], base)["CUDA_VISIBLE_DEVICES"] == "1,3"
    with pytest.raises(RuntimeError, match="not on this trainer"):
        trainer_env([2, 3], base)
    # a worker pinned to one GPU keeps it for a 1-slot run and refuses a multi-GPU one
    settings_env(
        HDM_DEVICE="cuda:0", HDM_SLOTS="0,1,2,3", HDM_SLOT_GROUPS="", HDM_LOCAL_SLOTS="", HDM_GPU_INDEX="2"
    )
    assert "CUDA_VISIBLE_DEVICES" not in trainer_env([2], base)
    with pytest.raises(RuntimeError, match="trainer service"):
        trainer_env([2, 3], base)


def test_train_queue_is_part_of_every_queue_list(settings_env) -> None:  # type: ignore[no-untyped-def]
    s = settings_env(HDM_SLOTS="0,1", HDM_QUEUE_PREFIX="hdm", HDM_SLOT_GROUPS="")
    assert s.train_queue(1) == "hdm.train.1" and {"hdm.train.0", "hdm.train.1"} <= set(s.all_queues)
    assert s.slot_group_list == [[0, 1]] and s.local_slot_list == [0, 1]


def test_time_distribution_reaches_the_trainer(settings_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings_env()
    cfg = _load(trainer_config(_request(t_logit_mean=1.0, t_logit_std=0.5), None), tmp_path)
    assert (cfg.objective.t_logit_mean, cfg.objective.t_logit_std) == (1.0, 0.5)
    default = _load(trainer_config(_request(), None), tmp_path).objective
    assert (default.t_logit_mean, default.t_logit_std) == (0.0, 1.0)  # spec §6


def test_dist_timeout_and_caches_reach_the_trainer(settings_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings_env(HDM_DIST_TIMEOUT_S=None)
    cfg = _load(trainer_config(_request(), None), tmp_path)
    assert cfg.train.dist_timeout_s == 1800 and not (cfg.cache.latents or cfg.cache.text)
    settings_env(HDM_DIST_TIMEOUT_S="7200")
    cfg = _load(trainer_config(_request(cache={"text": True}), None), tmp_path)
    assert cfg.train.dist_timeout_s == 7200 and cfg.cache.text and not cfg.cache.latents
    with pytest.raises(ValueError, match=r"cache\.texts"):  # unknown fields are refused
        _request(cache={"texts": True})
