"""POST /v1/datasets as multipart through the real stack (uvicorn + PostgreSQL + Redis + Celery worker): an archive
becomes the key's private dataset, trains an adapter that changes the image, and is deleted; every bad archive is
refused with a 4xx naming the problem and leaves nothing under the data root."""

from __future__ import annotations

import io
import re
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from service_stack import API_KEY, OTHER_KEY, Stack, own_database, stack_env

import hdm_core
from hdm_core.codec import PixelCodec
from tests.tagger_model import build_tagger

UPLOAD_LIMIT = 8 * 2**20
SMALL = {"width": 32, "height": 32, "steps": 2, "guidance_scale": 2.0, "seed": 7, "model": "ds-base"}


@pytest.fixture(scope="module")
def dstack(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dataset-stack")
    models = tmp / "models"
    models.mkdir()
    torch.manual_seed(0)
    model = hdm_core.XUT(hdm_core.PRESETS["xut-pixel-debug"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hdm_core.save_checkpoint(models / "ds-base.safetensors", model.eval(), codec=PixelCodec())
    with own_database(pg_admin) as url:
        env = stack_env(tmp, {**assets, "models": models}, url, redis_url, queue_prefix + "d")
        env["HDM_DATASET_UPLOAD_BYTES"] = str(UPLOAD_LIMIT)
        env["HDM_TAGGER"] = str(build_tagger(tmp / "tagger"))
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            s.start_worker(0)
            yield s
        finally:
            s.stop()


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(add: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        add(tf)
    return buf.getvalue()


def _tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _upload(s: Stack, filename: str, data: bytes, key: str = "default", **fields: str) -> httpx.Response:
    with s.client(key, timeout=300) as c:
        return c.post("/v1/datasets", files={"file": (filename, data)}, data={"name": "up", **fields})


def _wait_dataset(c: httpx.Client, ds_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while (ds := c.get(f"/v1/datasets/{ds_id}").json())["status"] == "validating":
        assert time.monotonic() < deadline, ds
        time.sleep(0.2)
    return ds


def _image(s: Stack, c: httpx.Client, body: dict[str, Any]) -> bytes:
    r = c.post("/v1/images", json={"prompt": "a zqx square", **SMALL, **body}, headers={"Prefer": "wait=60"})
    assert r.status_code in (200, 202), r.text
    job = s.wait_job(r.json()["id"], timeout=300)  # a busy machine may take longer than Prefer: wait
    assert job["status"] == "succeeded", job
    return c.get(f"/v1/images/{job['id']}/files/0").content


def test_upload_train_use_through_http(dstack: Stack) -> None:
    s = dstack
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30)] * 2
    entries = {f"squares/{i:02d}.png": _png(rgb) for i, rgb in enumerate(colours)}
    entries |= {f"squares/{i:02d}.txt": f"a {['red', 'blue'][i % 2]} square".encode() for i in range(0, 8, 2)}
    entries |= {
        "squares/notes.md": b"not an image",
        "__MACOSX/squares/._00.png": b"\x00",
        "squares/.DS_Store": b"x",
    }
    r = _upload(s, "squares.zip", _zip(entries), trigger_word="zqx", repeats="2")
    assert r.status_code == 202, r.text
    body = r.json()
    upload = body["upload"]
    assert upload["images"] == 8 and upload["trigger_word"] == "zqx" and upload["repeats"] == 2
    reasons = {item["file"]: item["reason"] for item in upload["skipped"]}
    assert set(reasons) == {"squares/notes.md", "__MACOSX/squares/._00.png", "squares/.DS_Store"}
    assert "neither an image" in reasons["squares/notes.md"]
    folder = Path(s.env["HDM_DATA_ROOT"]) / "uploads" / body["id"]
    assert (folder / "00.txt").read_text() == "zqx, a red square"  # trigger prepended
    assert (folder / "01.txt").read_text() == "zqx"  # no caption: the trigger word is the caption
    assert len(list(folder.glob("*.png"))) == 16  # repeats 2: each image twice (hard links)
    with s.client(timeout=180) as c, s.client(OTHER_KEY) as other:
        ds = _wait_dataset(c, body["id"])
        assert ds["status"] == "ready", ds
        assert other.get(f"/v1/datasets/{ds['id']}").status_code == 404
        assert ds["id"] not in [d["id"] for d in other.get("/v1/datasets").json()["data"]]
        train = {
            "name": "zqx-adapter",
            "base_model": "ds-base",
            "dataset": ds["id"],
            "precision": "fp32",
            "checkpoint_every": 4,
            "text_max_length": 16,
            "stages": [{"resolution": 16, "steps": 4, "batch_size": 2, "warmup_steps": 0}],
            "adapter": {"trigger_words": ["zqx"]},
        }
        r = c.post("/v1/train-jobs", json=train)
        assert r.status_code == 202, r.text
        job = r.json()
        r = c.delete(f"/v1/datasets/{ds['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use", r.text
        done = s.wait_job(job["id"], timeout=600, path="/v1/train-jobs")
        assert done["status"] == "succeeded", (done, s.logs())
        final = next(a for a in c.get("/v1/adapters").json()["data"] if a["name"] == f"{job['id']}-final")
        assert _image(s, c, {"adapters": [{"id": final["id"], "weight": 1.0}]}) != _image(s, c, {})
        assert final["id"] not in [a["id"] for a in other.get("/v1/adapters").json()["data"]]
        assert other.get(f"/v1/adapters/{final['id']}").status_code == 404
        r = c.delete(f"/v1/datasets/{ds['id']}")
        assert r.status_code == 200, r.text
        assert not folder.exists() and c.get(f"/v1/datasets/{ds['id']}").status_code == 404


def _bomb() -> bytes:
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("bomb.png", "w") as fh,
    ):
        zeros = bytes(1 << 24)
        for _ in range(64):  # 1 GiB of zeros, about 1 MB compressed
            fh.write(zeros)
    return buf.getvalue()


def _symlink(tf: tarfile.TarFile) -> None:
    _tar_file(tf, "set/a.png", _png((1, 2, 3)))
    link = tarfile.TarInfo("set/passwd.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tf.addfile(link)


BAD = {
    "dotdot": (
        "up.zip",
        lambda: _zip({"set/a.png": _png((1, 2, 3)), "set/../../evil.png": _png((1, 2, 3))}),
        422,
        "archive_unsafe_path",
    ),
    "absolute": (
        "up.tar.gz",
        lambda: _tar(lambda tf: _tar_file(tf, "/tmp/abs.png", _png((1, 2, 3)))),
        422,
        "archive_unsafe_path",
    ),
    "symlink": ("up.tar.gz", lambda: _tar(_symlink), 422, "archive_link_entry"),
    "zip bomb": ("up.zip", _bomb, 422, "archive_ratio"),
    "too many entries": (
        "up.zip",
        lambda: _zip({f"e{i}.txt": b"" for i in range(10_001)}),
        422,
        "archive_too_many_entries",
    ),
    "no image": ("up.zip", lambda: _zip({"a.txt": b"a caption", "b.md": b"x"}), 422, "archive_no_images"),
    "not an archive": (
        "up.zip",
        lambda: b"just some bytes, not an archive" * 10,
        422,
        "archive_not_an_archive",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archive_is_refused_and_leaves_nothing(dstack: Stack, case: str) -> None:
    filename, make, status, code = BAD[case]
    root = Path(dstack.env["HDM_DATA_ROOT"])
    before = _files_under(root)
    r = _upload(dstack, filename, make())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "file", err
    assert _files_under(root) == before
    with dstack.client() as c:
        assert "up" not in [d["name"] for d in c.get("/v1/datasets").json()["data"]]


def _rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]


def test_upload_over_the_byte_limit_is_413_while_streaming(dstack: Stack) -> None:
    assert dstack.api is not None
    root = Path(dstack.env["HDM_DATA_ROOT"])
    before = _files_under(root)
    boundary = "hdmboundary"
    sent = 0

    def body() -> Iterator[bytes]:  # chunked, no Content-Length: the limit is enforced as the bytes arrive
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        chunk = b"PK\x03\x04" + bytes((1 << 20) - 4)
        for _ in range(64):
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    rss = _rss_kib(dstack.api.pid)
    with dstack.client() as c:
        try:
            r = c.post(
                "/v1/datasets",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            r = None  # the server may close the connection before it read the rest
        if r is not None:
            assert r.status_code == 413 and r.json()["error"]["param"] == "file", r.text
            assert str(UPLOAD_LIMIT) in r.json()["error"]["message"]
        assert (_rss_kib(dstack.api.pid) - rss) / 1024 < 25, "API memory grew for a refused upload"
        assert c.get("/healthz").status_code == 200
    assert _files_under(root) == before


def test_tagger_captions_images_without_one(dstack: Stack) -> None:
    """HDM_TAGGER (a tiny WD14-style ONNX model, tests/tagger_model.py): images without a caption get the tagger's
    tags, then the trigger word; an image with a caption keeps it."""
    entries = {
        "t/red.png": _png((220, 30, 30)),
        "t/blue.png": _png((30, 30, 220)),
        "t/own.png": _png((30, 200, 30)),
    }
    entries["t/own.txt"] = b"my own words"
    r = _upload(dstack, "tag.zip", _zip(entries), trigger_word="zqt", caption="tagger")
    assert r.status_code == 202, r.text
    folder = Path(dstack.env["HDM_DATA_ROOT"]) / "uploads" / r.json()["id"]
    assert (folder / "red.txt").read_text() == "zqt, red square"
    assert (folder / "blue.txt").read_text() == "zqt, blue square"
    assert (folder / "own.txt").read_text() == "zqt, my own words"
    r = _upload(dstack, "up.zip", _zip({"a.png": _png((1, 2, 3))}), repeats="0")
    assert r.status_code == 422 and r.json()["error"]["param"] == "repeats", r.text
