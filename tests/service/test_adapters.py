"""Adapters through the real stack (uvicorn + PostgreSQL + Redis + Celery worker): registry, per-request adapters
with weights on the worker's cached model, exact return to the base model, A1111 parameters, merge (CLI and job)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from service_stack import API_KEY, OTHER_KEY, ROOT, Stack, own_database, stack_env

import hdm_core
from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.files import AdapterInfo, file_sha256, load_adapter, save_adapter
from hdm_core.adapters.network import AdapterConfig, attach
from hdm_core.codec import PixelCodec
from hdm_core.pipeline import sample_latents
from hdm_core.sampler import Conditioning
from hdm_core.train.config import ADAPTER_RECIPE_LR

SMALL = {"width": 32, "height": 32, "steps": 2, "guidance_scale": 2.0, "seed": 7, "model": "adapt-base"}


def _base_model(seed: int = 0, preset: str = "xut-pixel-debug", **changes: Any) -> hdm_core.XUT:
    """Random weights everywhere (XUT zero-initialises its output head, which would hide any adapter)."""
    torch.manual_seed(seed)
    model = hdm_core.XUT(hdm_core.PRESETS[preset].replace(**changes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _adapter(base: Path, model: hdm_core.XUT, cfg: AdapterConfig, path: Path, seed: int) -> Path:
    net = attach(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    info = AdapterInfo(base_model=base.stem, base_sha256=file_sha256(base), steps=5, trigger_words=("zq",))
    save_adapter(net, path, info)
    net.detach()
    return path


def _cli(stack: Stack, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A models folder with a base model (random weights) and adapter files, found by the start-up scan."""
    models = tmp_path_factory.mktemp("adapter-models")
    base = models / "adapt-base.safetensors"
    hdm_core.save_checkpoint(base, _base_model(), codec=PixelCodec())
    out = {"base": base}
    specs = {
        "style-a": AdapterConfig(),  # HDM's recipe: LoKr factor 4, full matrix, norms
        "style-b": AdapterConfig(algorithm="lora", rank=4, alpha=2.0),
    }
    for i, (name, cfg) in enumerate(specs.items()):
        out[name] = _adapter(
            base, _base_model(), cfg, models / "adapters" / f"{name}.safetensors", seed=i + 1
        )
    return out


@pytest.fixture(scope="module")
def astack(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[str, Path],
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    """A stack of its own (database, queues, models folder), so these models never become another test's default."""
    tmp = tmp_path_factory.mktemp("adapter-stack")
    with own_database(pg_admin) as url:
        env = stack_env(tmp, {**assets, "models": files["base"].parent}, url, redis_url, queue_prefix + "a")
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            s.start_worker(0)
            other = _base_model(preset="xut-pixel-debug", mlp_dim=256)
            files["other-arch"] = _adapter(
                files["base"], other, AdapterConfig(), tmp / "elsewhere" / "other-arch.safetensors", 9
            )
            _cli(s, "adapters", "import", str(files["other-arch"]))
            yield s
        finally:
            s.stop()


def _image(c: Any, body: dict[str, Any]) -> tuple[dict[str, Any], bytes, str]:
    body = {"prompt": "a zq circle", **SMALL, **body}
    r = c.post("/v1/images", json=body, headers={"Prefer": "wait=60"}, timeout=90)  # longer than the hold
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded", job
    png = c.get(f"/v1/images/{job['id']}/files/0").content
    img = Image.open(io.BytesIO(png))
    return job, img.tobytes(), img.text["parameters"]


def test_adapters_listed_with_metadata(astack: Stack, files: dict[str, Path]) -> None:
    with astack.client() as c:
        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
        assert set(listed) >= {"style-a", "style-b", "other-arch"}
        a = listed["style-a"]
        assert a["id"].startswith("adp_") and a["algorithm"] == "lokr" and a["config"]["factor"] == 4
        assert a["base_model"]["name"] == "adapt-base"
        assert a["base_model"]["sha256"] == file_sha256(files["base"])
        assert a["trigger_words"] == ["zq"] and a["steps"] == 5
        assert a["size_bytes"] == files["style-a"].stat().st_size and a["sha256"] == file_sha256(
            files["style-a"]
        )
        assert listed["style-b"]["algorithm"] == "lora" and listed["style-b"]["config"]["rank"] == 4
        assert c.get(f"/v1/adapters/{a['id']}").json()["name"] == "style-a"
        assert c.get(f"/v1/adapters/{a['id']}/file").content == files["style-a"].read_bytes()
        models = [m["name"] for m in c.get("/v1/models").json()["data"]]
        assert "adapt-base" in models and not {"style-a", "style-b", "other-arch"} & set(models)


def test_two_adapters_negative_weight_and_exact_return_to_base(astack: Stack, files: dict[str, Path]) -> None:
    with astack.client() as c:
        base_job, base, _ = _image(c, {})
        assert base_job["model_cache_hit"] is False  # loaded for this request: what a fresh worker draws
        both_job, both, params = _image(
            c, {"adapters": [{"id": "style-a", "weight": 0.7}, {"id": "style-b", "weight": -1.5}]}
        )
        one = _image(c, {"adapters": [{"id": "style-a", "weight": 0.7}]})[1]
        assert len({base, both, one}) == 3  # each adapter set changes the image
        assert both_job["model_cache_hit"] is True  # applied to the cached model, not reloaded
        assert [(a["name"], a["weight"]) for a in both_job["adapters"]] == [
            ("style-a", 0.7),
            ("style-b", -1.5),
        ]
        assert both_job["request"]["adapters"][1]["id"].startswith("adp_")
        assert params.startswith("a zq circle <lora:style-a:0.7> <lora:style-b:-1.5>\n"), params
        sha_a, sha_b = file_sha256(files["style-a"])[:10], file_sha256(files["style-b"])[:10]
        assert f'Lora hashes: "style-a: {sha_a}, style-b: {sha_b}"' in params, params
        # weight 0 right after the adapter was merged at 0.7: the worker takes it back out, bit for bit
        zero = _image(c, {"adapters": [{"id": "style-a", "weight": 0.0}]})[1]
        assert zero == base
        assert _image(c, {"adapters": [{"id": "style-a", "weight": 0.7}]})[1] == one  # merged again
        # the same set again keeps the merged weights and draws the same image
        assert _image(c, {"adapters": [{"id": "style-a", "weight": 0.7}]})[1] == one
        after_job, after, after_params = _image(c, {})  # no adapters right after a merged set
        assert after == base and after_job["adapters"] == []  # bit-identical to the freshly loaded model
        assert "<lora:" not in after_params and "Lora hashes" not in after_params


def test_openai_endpoint_takes_adapters(astack: Stack, files: dict[str, Path]) -> None:
    body = {"prompt": "a zq circle", "size": "32x32", "steps": 2, "seed": 7, "model": "adapt-base"}
    with astack.client() as c:
        r = c.post("/v1/images/generations", json={**body, "adapters": [{"id": "style-a", "weight": 0.7}]})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        r = c.post("/v1/images/generations", json={**body, "adapters": [{"id": "nope"}]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "adapters.0.id", r.text


def test_adapter_request_validation(astack: Stack, files: dict[str, Path]) -> None:
    ok = {"id": "style-a", "weight": 1.0}
    cases = [
        ([ok, {"id": "adp_missing", "weight": 1}], 422, "adapters.1.id", "unknown_adapter"),
        ([{"id": "other-arch", "weight": 1}], 422, "adapters.0.id", "adapter_arch_mismatch"),
        ([{"id": "style-a", "weight": 4.5}], 422, "adapters.0.weight", None),
        ([{"id": "style-a", "weight": -4.5}], 422, "adapters.0.weight", None),
        ([{"id": "style-a", "weight": 1, "scale": 2}], 422, "adapters.0.scale", "unknown_field"),
        ([ok] * 9, 422, "adapters", None),
        ([ok, ok], 422, "adapters.1.id", None),
    ]
    with astack.client() as c:
        for adapters, status, param, code in cases:
            r = c.post("/v1/images", json={"prompt": "x", **SMALL, "adapters": adapters})
            assert r.status_code == status and r.json()["error"]["param"] == param, (adapters, r.text)
            assert code is None or r.json()["error"]["code"] == code, r.text
        msg = c.post("/v1/images", json={"prompt": "x", **SMALL, "adapters": [{"id": "other-arch"}]}).json()
        assert "mlp_dim 256 (adapter) vs 320 (model)" in msg["error"]["message"], msg
        assert c.get("/v1/adapters/adp_missing").status_code == 404


def _latents(model: hdm_core.XUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, model.config.in_channels, 16, 16, generator=g)
    cond = Conditioning(torch.randn(1, 5, model.config.ctx_dim, generator=g))
    uncond = Conditioning(torch.zeros(1, 5, model.config.ctx_dim))
    return sample_latents(model, noise, cond, uncond, steps=3, guidance_scale=2.0)


def test_cli_merge_equals_base_plus_adapter(astack: Stack, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    printed = _cli(
        astack, "adapters", "merge", str(files["base"]), f"{files['style-a']}:1", "--out", str(out)
    )
    assert printed.splitlines()[-1] == str(out)
    merged = hdm_core.load_checkpoint(out)
    assert merged.codec is not None and merged.codec.kind == "pixel"
    merged_meta = json.loads(merged.metadata["hdm_merged_adapters"])
    assert merged_meta == [{"name": "style-a", "sha256": file_sha256(files["style-a"]), "weight": 1.0}]
    base = hdm_core.load_checkpoint(files["base"]).model
    base_latents = _latents(base)
    with apply_adapters(base, [(load_adapter(files["style-a"]), 1.0)]):
        applied = _latents(base)
    merged_latents = _latents(merged.model)
    assert (applied - base_latents).abs().max() > 1e-3
    assert (merged_latents - applied).abs().max() < 1e-4
    argv = [
        "adapters",
        "merge",
        str(files["base"]),
        str(files["other-arch"]),
        "--out",
        str(tmp_path / "bad.st"),
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        env=astack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "mlp_dim" in bad.stderr and not (tmp_path / "bad.st").exists()


def test_merge_job_registers_a_model_drawing_base_plus_adapter(astack: Stack, files: dict[str, Path]) -> None:
    with astack.client() as c:
        r = c.post(
            "/v1/models/adapt-base/merge",
            json={"adapters": [{"id": "style-b", "weight": 1.0}], "name": "adapt-base+b"},
            headers={"Prefer": "wait=60"},
            timeout=90,
        )
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["object"] == "merge_job" and job["status"] == "succeeded", job
        model = c.get(f"/v1/models/{job['model']}").json()
        assert model["name"] == "adapt-base+b" and model["source"] == "merge" and model["codec"] == "pixel"
        assert c.get(f"/v1/merge-jobs/{job['id']}").json()["model"] == job["model"]
        adapted = _image(c, {"adapters": [{"id": "style-b", "weight": 1.0}]})[1]
        merged = _image(c, {"model": "adapt-base+b"})[1]
        assert merged == adapted
        r = c.post("/v1/models/adapt-base/merge", json={"adapters": [{"id": "other-arch"}]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "adapters.0.id", r.text
        r = c.post("/v1/models/adapt-base/merge", json={"adapters": []})
        assert r.status_code == 422 and r.json()["error"]["param"] == "adapters", r.text


@pytest.fixture(scope="module")
def dataset_id(astack: Stack) -> str:
    root = Path(astack.env["HDM_DATA_ROOT"]) / "zq-squares"
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (32, 32), rgb).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a zq {name} square")
    with astack.client() as c:
        ds = c.post("/v1/datasets", json={"name": "zq", "path": "zq-squares"}).json()
        deadline = time.monotonic() + 60
        while (ds := c.get(f"/v1/datasets/{ds['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, ds
            time.sleep(0.2)
    assert ds["status"] == "ready", ds
    return str(ds["id"])


def _train_body(dataset: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": "zq-adapter",
        "base_model": "adapt-base",
        "dataset": dataset,
        "precision": "fp32",
        "checkpoint_every": 2,
        "text_max_length": 16,
        "stages": [{"resolution": 16, "steps": 4, "batch_size": 2, "warmup_steps": 0}],
        "adapter": {"trigger_words": ["zq"]},
        **kw,
    }


def test_adapter_train_job_registers_an_adapter_usable_in_images(
    astack: Stack, files: dict[str, Path], dataset_id: str
) -> None:
    s = astack
    with s.client() as c:
        r = c.post("/v1/train-jobs", json=_train_body(dataset_id))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["request"]["stages"][0]["lr"] == ADAPTER_RECIPE_LR  # HDM's recipe where none was given
        done = s.wait_job(job["id"], timeout=300, path="/v1/train-jobs")
        assert done["status"] == "succeeded", (done, s.logs())
        config = tomllib.loads((Path(s.env["HDM_RUNS_DIR"]) / job["id"] / "config.toml").read_text())
        assert config["adapter"]["algorithm"] == "lokr" and config["adapter"]["factor"] == 4
        assert config["adapter"]["base_name"] == "adapt-base" and config["model"]["init_from"]
        assert (
            done["checkpoints"] == [] and len(done["adapters"]) >= 2
        )  # snapshots at steps 2, 4 and the final
        listed = {a["id"]: a for a in c.get("/v1/adapters").json()["data"]}
        final = next(listed[i] for i in done["adapters"] if listed[i]["name"] == f"{job['id']}-final")
        assert final["source"] == "train_job" and final["train_job"] == job["id"] and final["steps"] == 4
        assert final["base_model"]["name"] == "adapt-base"
        assert final["base_model"]["sha256"] == file_sha256(files["base"])
        assert final["trigger_words"] == ["zq"] and final["algorithm"] == "lokr"
        assert final["size_bytes"] < 0.05 * files["base"].stat().st_size
        base = _image(c, {})[1]
        trained = _image(c, {"adapters": [{"id": final["id"], "weight": 1.0}]})[1]
        assert trained != base
        # another key neither sees nor uses it
        with s.client(OTHER_KEY) as other:
            assert final["id"] not in {a["id"] for a in other.get("/v1/adapters").json()["data"]}
            r = other.post("/v1/images", json={"prompt": "x", **SMALL, "adapters": [{"id": final["id"]}]})
            assert r.status_code == 422 and r.json()["error"]["param"] == "adapters.0.id"


def test_adapter_train_job_validation(astack: Stack, files: dict[str, Path], dataset_id: str) -> None:
    cases = [
        ({"base_model": None}, "base_model"),
        ({"adapter": {"factor": 1}}, "adapter.factor"),
        ({"adapter": {"algorithm": "dora"}}, "adapter.algorithm"),
        ({"adapter": {"rank": 0}}, "adapter.rank"),
        ({"adapter": {"targets": []}}, "adapter.targets"),
        ({"adapter": {"alpha": 0}}, "adapter.alpha"),
        ({"adapter": {"dropout": 0.1}}, "adapter.dropout"),
        ({"adapter": {"save_dtype": "fp8"}}, "adapter.save_dtype"),
    ]
    with astack.client() as c:
        for change, param in cases:
            r = c.post("/v1/train-jobs", json=_train_body(dataset_id, **change))
            assert r.status_code == 422 and r.json()["error"]["param"] == param, (change, r.text)


def test_scan_registers_adapters_apart_from_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up scans (SQLite, the scan functions themselves): an adapter file is registered as an adapter and
    never as a model; a LyCORIS file without hdm-serve metadata and an XUT checkpoint are not adapters."""
    from safetensors.torch import save_file

    from app.db import reset_caches, session_scope
    from app.migrate import upgrade
    from app.models import Adapter, Checkpoint
    from app.services import adapters, models
    from app.settings import get_settings

    folder = tmp_path / "models"
    base = folder / "base.safetensors"
    hdm_core.save_checkpoint(base, _base_model(), codec=PixelCodec())
    _adapter(base, _base_model(), AdapterConfig(), folder / "loras" / "mine.safetensors", seed=1)
    save_file({"lycoris_backbone_x.lokr_w1": torch.zeros(2)}, str(folder / "foreign.safetensors"))
    assert adapters.is_adapter_file(folder / "loras" / "mine.safetensors")
    assert not adapters.is_adapter_file(folder / "foreign.safetensors")
    assert not adapters.is_adapter_file(base) and not models.is_xut_checkpoint(
        folder / "loras" / "mine.safetensors"
    )
    url = f"sqlite:///{tmp_path / 'hdm.db'}"
    monkeypatch.setenv("HDM_DATABASE_URL", url)
    monkeypatch.setenv("HDM_MODELS_DIR", str(folder))
    get_settings.cache_clear()
    reset_caches()
    try:
        upgrade(url)
        with session_scope() as session:
            assert models.scan_models_dir(session) == 1
            assert adapters.scan_models_dir(session) == 1
            assert adapters.scan_models_dir(session) == 1  # the same row again, not a second one
            assert [c.name for c in session.query(Checkpoint)] == ["base"]
            rows = list(session.query(Adapter))
            assert [(a.name, a.algorithm, a.base_model, a.owner) for a in rows] == [
                ("mine", "lokr", "base", None)
            ]
    finally:
        get_settings.cache_clear()
        reset_caches()
