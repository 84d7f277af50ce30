"""POST /v1/adapters (and the torch-free upload edges of /v1/images/parameters, /v1/datasets) through the real API (uvicorn + PostgreSQL): adapter files made elsewhere uploaded as the
calling key's own, stored in this service's format, and the stored file applied to the base model computes what
LyCORIS' own hooked forward computes; pickles that would run code, and layers of another shape, are refused with
a 422 naming them, leaving nothing behind."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save, save_file
from service_stack import ADMIN_KEY, API_KEY, OTHER_KEY, Stack, own_database, stack_env

import hdm_core
from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.files import load_adapter
from hdm_core.codec import PixelCodec
from tests.adapter_files import evil_pickle, foreign_network, inputs, kohya_names, peft_names


def _base() -> hdm_core.XUT:
    torch.manual_seed(0)
    model = hdm_core.XUT(hdm_core.PRESETS["xut-pixel-debug"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def ustack(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("upload-stack")
    models = tmp / "models"
    models.mkdir()
    hdm_core.save_checkpoint(models / "upload-base.safetensors", _base(), codec=PixelCodec())
    with own_database(pg_admin) as url:
        env = stack_env(tmp, {**assets, "models": models}, url, redis_url, queue_prefix + "u")
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            yield s
        finally:
            s.stop()


def _upload(stack: Stack, name: str, filename: str, data: bytes, key: str = "default") -> Any:
    with stack.client(key, timeout=300) as c:
        return c.post("/v1/adapters", files={"file": (filename, data)}, data={"name": name})


def _stored_output(stack: Stack, adapter: dict[str, Any], tmp_path: Path) -> torch.Tensor:
    with stack.client() as c:
        r = c.get(f"/v1/adapters/{adapter['id']}/file")
    assert r.status_code == 200, r.text
    (tmp_path / "stored.safetensors").write_bytes(r.content)
    model = _base()
    with apply_adapters(model, [(load_adapter(tmp_path / "stored.safetensors"), 1.0)]), torch.no_grad():
        return model(*inputs(model))


def _uploads_left(stack: Stack) -> list[Path]:
    folder = Path(stack.env["HDM_OUTPUTS_DIR"]) / "uploads" / "adapters"
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("recipe", ["lokr", "loha", "lora"])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_uploaded_lycoris_file_matches_library_forward(ustack, tmp_path, recipe, container):
    state, hooked = foreign_network(_base(), recipe)
    if container == "pt":
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    else:
        data = save(state)
    r = _upload(ustack, f"{recipe}-{container}", f"hdm-trainer.{container}", data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["algorithm"] == recipe and body["source"] == "upload"
    assert body["base_model"]["name"] == "upload-base"
    assert (_stored_output(ustack, body, tmp_path) - hooked).abs().max() <= 1e-4
    with ustack.client(OTHER_KEY) as c:  # the calling key's own: another key sees nothing of it
        assert c.get(f"/v1/adapters/{body['id']}").status_code == 404
        assert body["id"] not in [a["id"] for a in c.get("/v1/adapters").json()["data"]]


@pytest.mark.parametrize("names", ["kohya", "peft"])
def test_uploaded_kohya_and_peft_named_lora(ustack, tmp_path, names):
    model = _base()
    if names == "kohya":
        state, hooked = foreign_network(model, "lora")
        tensors = kohya_names(state)
    else:  # peft carries its alpha outside the tensors; alpha == rank is scale 1
        state, hooked = foreign_network(model, "lora-alpha-rank")
        tensors = {k: v for k, v in peft_names(state, model).items() if not k.endswith(".alpha")}
    save_file(
        tensors, str(tmp_path / "f.safetensors"), metadata={"ss_tag_frequency": '{"10_zqstyle": {"a": 1}}'}
    )
    r = _upload(ustack, f"lora-{names}", "lora.safetensors", (tmp_path / "f.safetensors").read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["trigger_words"] == ["zqstyle"]
    assert (_stored_output(ustack, r.json(), tmp_path) - hooked).abs().max() <= 1e-4


def test_pickle_that_runs_code_is_refused_and_runs_nothing(ustack, tmp_path):
    marker = tmp_path / "ran"
    data = evil_pickle(tmp_path / "evil.pt", marker).read_bytes()
    r = _upload(ustack, "evil", "evil.pt", data)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and err["code"] == "adapter_refused" and "weights_only" in err["message"]
    assert not marker.exists()
    assert _uploads_left(ustack) == [] or all(p.suffix == ".safetensors" for p in _uploads_left(ustack))
    with ustack.client() as c:
        assert "evil" not in [a["name"] for a in c.get("/v1/adapters").json()["data"]]


def test_layers_of_another_shape_are_named_and_nothing_is_kept(ustack, tmp_path):
    state, _ = foreign_network(_base(), "lora")
    key = next(k for k in state if k.endswith("attn_qkv.lora_up.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 8, state[key].shape[1])
    before = _uploads_left(ustack)
    r = _upload(ustack, "wrong-shape", "wrong.safetensors", save(state))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "file" and "attn.qkv" in r.json()["error"]["message"]
    assert _uploads_left(ustack) == before
    r = _upload(ustack, "no-adapter", "x.safetensors", save({"some.weight": torch.zeros(3)}))
    assert r.status_code == 422 and "name no module" in r.json()["error"]["message"], r.text
    r = _upload(ustack, "not-a-file", "x.safetensors", b"not safetensors at all")
    assert r.status_code == 422 and "not a readable safetensors" in r.json()["error"]["message"], r.text
    assert _uploads_left(ustack) == before


def test_png_parameters_read_back_into_a_request(ustack, tmp_path):
    """A1111's "PNG Info" / "send to txt2img": the text this service writes, back as a POST /v1/images body."""
    from PIL import Image

    from hdm_core import imagefile

    req = {
        "prompt": "a zq circle, on blue",
        "negative_prompt": "blurry, dark",
        "steps": 7,
        "sampler": "euler",
        "guidance_scale": 2.5,
        "width": 64,
        "height": 48,
        "camera": {"x_shift": 0.25, "y_shift": -0.5, "zoom": 1.25},
        "tread_guidance": {"cond_rate": 0.5, "uncond_rate": 0.25},
    }
    text = imagefile.parameters_text(
        req, seed=99, model_name="upload-base", model_hash="ab" * 32, adapters=[("style", 0.75, "cd" * 32)]
    )
    imagefile.save(Image.new("RGB", (64, 48)), tmp_path / "a.png", "png", text)
    with ustack.client() as c:
        r = c.post("/v1/images/parameters", files={"file": ("a.png", (tmp_path / "a.png").read_bytes())})
        assert r.status_code == 200, r.text
        assert r.json()["request"] == {
            **req,
            "seed": 99,
            "model": "upload-base",
            "adapters": [{"id": "style", "weight": 0.75}],
        }
        plain = io.BytesIO()
        Image.new("RGB", (8, 8)).save(plain, format="PNG")
        r = c.post("/v1/images/parameters", files={"file": ("b.png", plain.getvalue())})
        assert r.status_code == 422 and r.json()["error"]["code"] == "no_parameters", r.text
        r = c.post("/v1/images/parameters", files={"file": ("c.png", b"not an image")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text


def test_dataset_tagger_caption_without_tagger_is_refused(ustack):
    """This stack has no HDM_TAGGER: `caption: tagger` is refused naming the field, nothing is kept."""
    import zipfile

    from PIL import Image

    root = Path(ustack.env["HDM_DATA_ROOT"])
    before = sorted(root.rglob("*"))
    png, buf = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", png.getvalue())
    with ustack.client() as c:
        r = c.post(
            "/v1/datasets", files={"file": ("a.zip", buf.getvalue())}, data={"name": "t", "caption": "tagger"}
        )
    assert r.status_code == 422 and r.json()["error"]["param"] == "caption", r.text
    assert "HDM_TAGGER" in r.json()["error"]["message"]
    assert sorted(root.rglob("*")) == before


def test_cli_import_takes_the_same_formats_and_shares(ustack, tmp_path):
    """`hdm adapters import` on a kohya-named file: converted into the models folder, shared with every key."""
    import subprocess
    import sys

    from service_stack import ROOT

    state, hooked = foreign_network(_base(), "lora")
    save_file(kohya_names(state), str(tmp_path / "kohya.safetensors"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "adapters",
            "import",
            str(tmp_path / "kohya.safetensors"),
            "--name",
            "cli-k",
        ],
        env=ustack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    adapter_id, name = out.stdout.split()
    assert name == "cli-k"
    with ustack.client(OTHER_KEY) as c:  # shared: every key sees it, a plain key without the server's path
        row = c.get(f"/v1/adapters/{adapter_id}").json()
    assert row["source"] == "import" and Path(row["path"]).parent == Path("models/adapters")
    with ustack.client(ADMIN_KEY) as c:
        seen_by_admin = c.get(f"/v1/adapters/{adapter_id}").json()["path"]
    assert Path(seen_by_admin) == Path(ustack.env["HDM_MODELS_DIR"]) / "adapters" / Path(row["path"]).name
    assert (_stored_output(ustack, row, tmp_path) - hooked).abs().max() <= 1e-4
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "adapters",
            "import",
            str(evil_pickle(tmp_path / "e.pt", tmp_path / "m")),
        ],
        env=ustack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "weights_only" in bad.stderr and not (tmp_path / "m").exists()
