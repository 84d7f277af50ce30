"""The web console in a real headless Chromium against a real `hdm serve`. Tests run in file order on one browser
session; each leaves a screenshot of its page in var/screenshots/. The last test checks Chrome's performance log:
every request the page made went to the service."""

from __future__ import annotations

import base64
import io
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from console_page import ADMIN_KEY, KEY, Console
from PIL import Image

from hdm_core.train.config import ADAPTER_RECIPE_LR

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


def _js(c: Console, script: str) -> object:
    return c.driver.execute_script(script)


def test_wrong_key_is_refused(console: Console) -> None:
    c = console
    c.open()
    c.wait(lambda: c.find("#key-panel").is_displayed(), 30, "the key form")
    assert not c.find("#nav").is_displayed() and not c.find("#page-generate").is_displayed()
    c.screenshot("01-key")
    c.find("#api-key").send_keys("wrong-key")
    c.find("#key-submit").click()
    err = c.wait(lambda: c.find("#key-error").is_displayed() and c.find("#key-error"), 15, "the refusal")
    assert "refused" in err.text and "invalid_api_key" in err.text, err.text
    assert not c.find("#nav").is_displayed()  # still nothing shown
    c.screenshot("02-key-refused")
    c.find("#api-key").clear()
    c.login(KEY)
    assert c.find("#nav").is_displayed() and not c.find("#key-panel").is_displayed()
    assert c.find("#key-state").text == "key accepted"


def _set_common(c: Console, prompt: str, width: int, height: int, steps: int) -> None:
    c.fill("#gen-prompt", prompt)
    c.fill("#gen-width", width)
    c.fill("#gen-height", height)
    c.fill("#gen-steps", steps)


def test_generate_shows_progress_and_image(console: Console) -> None:
    c = console
    c.login()
    c.go("generate")
    c.wait(lambda: len(c.finds("#gen-model option")) >= 2, 15, "models in the select")
    _set_common(c, "a red square", 32, 32, 12)
    c.fill("#gen-seed", 1234)
    c.fill("#gen-n", 2)
    c.find("#gen-submit").click()
    c.wait(lambda: c.find("#gen-job").get_attribute("data-status") == "succeeded", 120, "the job to succeed")
    imgs = c.wait(
        lambda: len(c.finds("#gen-results img")) == 2 and c.finds("#gen-results img"), 30, "2 images"
    )
    assert all(i.get_attribute("src").startswith("blob:") for i in imgs)
    assert all(
        _js(c, f"return document.querySelectorAll('#gen-results img')[{k}].naturalWidth") == 32
        for k in (0, 1)
    )
    # progress came from the SSE stream: one event per step, the bar full at the end
    assert int(c.find("#gen-job").get_attribute("data-progress-events")) >= 1
    assert (
        c.find("#gen-progress").get_attribute("value") == c.find("#gen-progress").get_attribute("max") == "12"
    )
    assert "step 12/12" in c.find("#gen-status").text
    captions = [f.text for f in c.finds("#gen-results figcaption")]
    assert captions == ["seed 1234 · 32×32", "seed 1235 · 32×32"], captions
    params = c.find("#gen-params").text
    assert "a red square" in params and "seed\n1234" in params and "steps\n12" in params, params
    links = c.finds("#gen-results a[download]")
    assert len(links) == 2 and links[0].get_attribute("download").endswith("-0.png")
    c.find("#gen-seed").clear()
    c.find("#gen-seed-reuse").click()
    assert c.find("#gen-seed").get_attribute("value") == "1234"
    c.finds("#gen-results .send-img2img")[0].click()
    assert c.find("#gen-img2img").is_displayed()
    assert c.find("#gen-init-preview").get_attribute("src") == imgs[0].get_attribute("src")
    c.screenshot("03-generate")
    # the result goes back as init_image; strength 0 returns it unchanged (pixel model)
    c.wait(lambda: c.find("#gen-img2img").get_attribute("data-ready") == "1", 15, "the init image read")
    c.fill("#gen-strength", 0)
    c.fill("#gen-n", 1)
    c.find("#gen-submit").click()
    c.wait(lambda: "upl_" in c.find("#gen-params").text, 120, "an edit job's parameters")
    assert "strength\n0" in c.find("#gen-params").text
    c.find("#gen-init-clear").click()


def test_cancel_long_job_from_the_page(console: Console) -> None:
    c = console
    c.login()
    c.go("generate")
    _set_common(c, "a slow blue square", 128, 128, 200)
    c.fill("#gen-n", 1)
    c.find("#gen-submit").click()
    c.wait(
        lambda: int(c.find("#gen-job").get_attribute("data-progress-events") or 0) >= 1,
        120,
        "sampling to start",
    )
    c.find("#gen-cancel").click()
    c.wait(lambda: c.find("#gen-job").get_attribute("data-status") == "cancelled", 60, "the cancel")
    job_id = c.find("#gen-job").get_attribute("data-job-id")
    with c.client() as api:
        job = api.get(f"/v1/images/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 200 and job["images"] == []
    assert "cancelled" in c.find("#gen-status").text
    assert c.find("#gen-submit").is_enabled() and not c.find("#gen-cancel").is_enabled()
    c.screenshot("04-generate-cancelled")


def test_gallery_filters_and_generates_again(console: Console) -> None:
    c = console
    c.login()
    c.go("gallery")
    c.wait(lambda: len(c.finds("#gal-list .card")) >= 2, 20, "gallery cards")
    statuses = {card.find_element("css selector", ".badge").text for card in c.finds("#gal-list .card")}
    assert {"succeeded", "cancelled"} <= statuses
    c.wait(lambda: len(c.finds("#gal-list .card img")) >= 2, 20, "thumbnails")
    c.screenshot("05-gallery")
    with c.client() as api:
        tiny = next(m["id"] for m in api.get("/v1/models").json()["data"] if m["name"] == "tiny")

    def cards(status: str, model: str = "") -> list[str]:
        c.select("#gal-status", status)
        c.select("#gal-model", model)
        c.find("#gal-filter button").click()
        c.wait(
            lambda: c.find("#gal-list").get_attribute("data-shown") == f"{status}|{model}", 20, "the filter"
        )
        return [e.text for e in c.finds("#gal-list .card .badge")]

    assert cards("cancelled") == ["cancelled"]
    assert cards("succeeded") == ["succeeded", "succeeded"]  # the edit job, then the first job
    assert len(cards("", tiny)) == 3  # all made with the default model, tiny
    assert cards("succeeded", tiny) == ["succeeded", "succeeded"]
    c.find("#gal-list .card .again").click()
    c.wait(lambda: c.find("#page-generate").is_displayed(), 10, "the generate page")
    assert c.find("#gen-prompt").get_attribute("value") == "a red square"
    assert c.find("#gen-seed").get_attribute("value") == "1234"
    assert c.find("#gen-steps").get_attribute("value") == "12"


def _make_dataset(root: Path, n: int = 16) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        Image.new("RGB", (32, 32), COLORS[names[i % 4]]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {names[i % 4]} square")
    Image.new("RGB", (32, 32)).save(root / "nocaption.png")


def test_datasets_register_and_show_the_report(console: Console) -> None:
    c = console
    _make_dataset(c.data_root / "squares")
    c.login()
    c.go("datasets")
    c.fill("#ds-path", "../outside")
    c.fill("#ds-name", "outside")
    c.find("#ds-submit").click()
    err = c.wait(lambda: c.find("#ds-error").is_displayed() and c.find("#ds-error"), 15, "the refusal")
    assert "path" in err.text, err.text
    c.fill("#ds-name", "squares")
    c.fill("#ds-path", "squares")
    c.find("#ds-submit").click()
    card = c.wait(
        lambda: [d for d in c.finds("#ds-list .dataset") if d.get_attribute("data-status") == "ready"],
        60,
        "validation",
    )[0]
    assert "17 images, 16 with captions" in card.text and "missing captions: 1" in card.text, card.text
    c.screenshot("06-datasets")


@pytest.fixture(scope="module")
def dataset_id(console: Console) -> str:
    with console.client() as api:
        ready = [d for d in api.get("/v1/datasets").json()["data"] if d["status"] == "ready"]
    assert ready, "test_datasets_register_and_show_the_report registers the dataset"
    return str(ready[0]["id"])


def test_training_curve_grows_with_checkpoints_cancel_resume(console: Console, dataset_id: str) -> None:
    c = console
    c.login()
    c.go("training")
    c.wait(lambda: c.find(f'#train-dataset option[value="{dataset_id}"]'), 15, "the dataset in the form")
    c.select("#train-preset", "pretrain")
    c.fill("#train-name", "squares-console")
    c.fill("#train-arch", "xut-pixel-debug")
    c.select("#train-precision", "fp32")
    c.fill("#train-text-len", 16)
    c.fill("#train-ckpt-every", 10)
    c.fill("#train-keep", 2)
    c.fill("#train-sample-every", 10)
    c.fill("#train-sample-prompts", "a red square")
    for key, value in {
        "resolution": 16,
        "steps": 3000,
        "batch_size": 4,
        "lr": 0.001,
        "warmup_steps": 0,
    }.items():
        c.fill(f"#stage-0-{key}", value)
    c.screenshot("07-training-form")
    c.find("#train-submit").click()
    c.wait(lambda: c.find("#page-trainjob").is_displayed(), 15, "the job page")
    points = lambda: int(c.find("#tj-loss").get_attribute("data-points") or 0)  # noqa: E731
    first = c.wait(lambda: points() >= 2 and points(), 240, "the first loss points")
    c.wait(lambda: points() >= first + 5, 120, "the loss curve to grow")
    assert int(c.find("#tj-lr").get_attribute("data-points")) >= first + 5
    c.wait(lambda: c.finds("#tj-checkpoints .checkpoint"), 120, "a checkpoint")
    sample = c.wait(lambda: c.finds("#tj-samples .sample img"), 120, "a sample image")[0]
    assert sample.get_attribute("src").startswith("blob:")  # fetched with the key, not an <img> to the API
    name = c.find("#tj-samples .sample figcaption").text
    assert name.startswith("step-") and name.endswith(".png"), name
    c.wait(lambda: _js(c, "return document.querySelector('#tj-samples img').naturalWidth") > 0, 10, "decoded")
    stats = c.find("#tj-stats").text
    assert "images/s" in stats and "running" in stats, stats
    c.screenshot("08-training-job")
    assert "not an adapter job" in c.find("#tj-adapters").text
    job_id = c.driver.current_url.rsplit("/", 1)[1]
    c.find("#tj-cancel").click()
    c.wait(lambda: c.find("#page-trainjob").get_attribute("data-status") == "cancelled", 90, "cancelled")
    c.wait(lambda: c.find("#tj-resume").is_enabled(), 10, "resume enabled")
    c.find("#tj-resume").click()
    c.wait(
        lambda: c.find("#page-trainjob").get_attribute("data-status") in ("queued", "running"), 30, "resumed"
    )
    before = points()
    c.wait(lambda: points() > before, 240, "the resumed run's metrics on the same curve")
    c.find("#tj-cancel").click()
    c.wait(
        lambda: c.find("#page-trainjob").get_attribute("data-status") == "cancelled", 90, "cancelled again"
    )
    with c.client() as api:
        assert api.get(f"/v1/train-jobs/{job_id}").json()["status"] == "cancelled"
        ckpts = api.get(f"/v1/train-jobs/{job_id}/checkpoints").json()["data"]
    c.wait(lambda: len(c.finds("#tj-checkpoints .gen-with")) == len(ckpts), 15, "every checkpoint listed")
    c.finds("#tj-checkpoints .gen-with")[-1].click()
    c.wait(lambda: c.find("#page-generate").is_displayed(), 10, "the generate page")
    assert c.find("#gen-model").get_attribute("value") == ckpts[-1]["id"]


def _tiny_id(c: Console) -> str:
    with c.client() as api:
        return next(m["id"] for m in api.get("/v1/models").json()["data"] if m["name"] == "tiny")


def test_adapter_job_then_generate_with_its_adapter(console: Console, dataset_id: str) -> None:
    c = console
    c.login()
    c.go("training")
    c.wait(lambda: c.find(f'#train-dataset option[value="{dataset_id}"]'), 15, "the dataset in the form")
    c.select("#train-preset", "adapter")
    assert c.find("#train-adapter").is_displayed() and c.find("#train-base-box").is_displayed()
    assert not c.find("#train-arch-box").is_displayed()
    with c.client() as api:  # the form starts from the API's defaults (HDM's LoKr recipe)
        spec = api.get("/openapi.json").json()["components"]["schemas"]["AdapterSpec"]["properties"]
    assert c.find("#ad-algorithm").get_attribute("value") == spec["algorithm"]["default"]
    for field in ("factor", "rank", "alpha"):
        assert float(c.find(f"#ad-{field}").get_attribute("value")) == spec[field]["default"], field
    assert c.find("#ad-full-matrix").is_selected() is spec["full_matrix"]["default"]
    assert c.find("#ad-train-norm").is_selected() is spec["train_norm"]["default"]
    assert float(c.find("#stage-0-lr").get_attribute("value")) == ADAPTER_RECIPE_LR
    tiny = _tiny_id(c)
    c.select("#train-base", tiny)
    c.fill("#train-name", "squares-adapter")
    c.select("#train-precision", "fp32")
    c.fill("#train-text-len", 16)
    c.fill("#train-ckpt-every", 2)
    c.fill("#train-sample-every", 0)
    c.fill("#ad-trigger", "zq")
    for key, value in {"resolution": 16, "steps": 2, "batch_size": 2, "warmup_steps": 0}.items():
        c.fill(f"#stage-0-{key}", value)
    c.find("#train-submit").click()
    c.wait(lambda: c.find("#page-trainjob").is_displayed(), 15, "the job page")
    adapter = c.wait(lambda: c.finds("#tj-adapters .adapter"), 240, "the job's adapter")[0]
    adapter_id = adapter.get_attribute("data-id")
    c.screenshot("09-adapter-job")
    adapter.find_element("css selector", ".gen-with").click()
    c.wait(lambda: c.find("#page-generate").is_displayed(), 10, "the generate page")
    row = c.wait(lambda: c.finds("#gen-adapter-rows .adapter-row"), 10, "the adapter in the picker")[0]
    assert row.get_attribute("data-id") == adapter_id
    assert c.find("#gen-model").get_attribute("value") == tiny  # the job's base model
    name = row.get_attribute("data-name")
    weight = row.find_element("css selector", "input")
    weight.clear()
    weight.send_keys("-0.5")  # a negative weight pushes away from what it learned
    _set_common(c, "a red square zq", 32, 32, 3)
    c.fill("#gen-seed", 5)
    c.fill("#gen-n", 1)
    c.find("#gen-submit").click()
    c.wait(lambda: c.find("#gen-job").get_attribute("data-status") == "succeeded", 120, "the adapter job")
    params = c.wait(
        lambda: "adapters" in c.find("#gen-params").text and c.find("#gen-params").text, 15, "params"
    )
    assert f"{name} × -0.5" in params, params
    c.wait(lambda: c.finds("#gen-results img"), 30, "the image")
    job_id = c.find("#gen-job").get_attribute("data-job-id")
    with c.client() as api:
        assert api.get(f"/v1/images/{job_id}").json()["adapters"] == [
            {"id": adapter_id, "name": name, "weight": -0.5}
        ]
    c.screenshot("10-generate-adapter")
    c.go("gallery")  # "generate again" brings the adapter back
    c.wait(lambda: c.finds(f'#gal-list .card[data-job-id="{job_id}"] .adapters-used'), 20, "the card")
    c.find(f'#gal-list .card[data-job-id="{job_id}"] .again').click()
    rows = c.wait(lambda: c.finds("#gen-adapter-rows .adapter-row"), 10, "the adapter again")
    assert [r.find_element("css selector", "input").get_attribute("value") for r in rows] == ["-0.5"]


def test_models_flags_merge_and_admin_actions(console: Console) -> None:
    c = console
    c.login()
    c.go("models")
    rows = c.wait(lambda: c.finds("#models-list tr[data-id]"), 15, "models")
    defaults = [r for r in rows if r.get_attribute("data-default") == "1"]
    assert len(defaults) == 1 and defaults[0].find_element("css selector", ".name").text == "tiny"
    assert "default" in defaults[0].text and "shared" in defaults[0].text
    trained = next(r for r in rows if "train_" in r.text)
    assert "yours" in trained.text and "default" not in trained.find_element("css selector", "td").text
    trained_id = trained.get_attribute("data-id")
    # an adapter merged into tiny: a merge job, then the new model is listed
    c.wait(lambda: c.finds("#adapters-list tr[data-id]"), 15, "the adapter list")
    c.click(c.find("#adapters-list tr[data-id] .merge"))
    assert c.find("#merge-model").get_attribute("value") == _tiny_id(c)  # the adapter's base model
    c.fill("#merge-name", "tiny-merged")
    c.find("#merge-submit").click()
    c.wait(lambda: c.find("#merge-status").get_attribute("data-status") == "succeeded", 120, "the merge job")
    merged = c.wait(lambda: c.finds("#models-list tr.new"), 15, "the merged model")[0]
    assert "tiny-merged" in merged.text and "yours" in merged.text
    c.screenshot("11-models")
    # a plain key: the API refuses "make default", and the page then hides what only an admin key may do
    c.click(c.find(f'#models-list tr[data-id="{trained_id}"] .make-default'))
    err = c.wait(
        lambda: c.find("#models-error").is_displayed() and c.find("#models-error"), 15, "the refusal"
    )
    assert "admin_required" in err.text, err.text
    c.wait(lambda: not c.finds(".make-default") and not c.find("#import-box").is_displayed(), 10, "hidden")
    # an admin key: import a file of the models folder, make it the default, delete it
    c.find("#key-change").click()
    c.login(ADMIN_KEY)
    c.go("models")
    c.wait(lambda: c.finds(".make-default"), 15, "the admin buttons")
    shutil.copy(c.models_dir / "tiny.safetensors", c.models_dir / "imported.safetensors")
    c.find("#import-box summary").click()
    c.fill("#import-path", "missing.safetensors")
    c.find("#import-submit").click()
    err = c.wait(lambda: c.find("#models-error").is_displayed() and c.find("#models-error"), 15, "the 422")
    assert "not_a_file" in err.text and "(field: path)" in err.text, err.text
    c.fill("#import-path", "imported.safetensors")
    c.find("#import-submit").click()
    row = lambda name: next(  # noqa: E731
        r for r in c.finds("#models-list tr[data-id]") if r.find_element("css selector", ".name").text == name
    )
    c.wait(lambda: row("imported"), 15, "the imported model")
    c.click(row("imported").find_element("css selector", ".make-default"))
    c.wait(lambda: row("imported").get_attribute("data-default") == "1", 15, "the new default")
    assert row("tiny").get_attribute("data-default") == ""
    c.screenshot("12-models-admin")
    c.click(row("tiny").find_element("css selector", ".make-default"))
    c.wait(lambda: row("tiny").get_attribute("data-default") == "1", 15, "tiny the default again")
    c.click(row("imported").find_element("css selector", ".delete"))
    assert "imported" in c.accept_confirm()
    c.wait(lambda: not [r for r in c.finds("#models-list .name") if r.text == "imported"], 15, "deleted")
    assert not (c.models_dir / "imported.safetensors").exists()
    c.go("gallery")
    c.select("#gal-model", trained_id)
    c.find("#gal-filter button").click()
    c.wait(lambda: "No image jobs match." in c.find("#gal-list").text, 20, "no job made with the checkpoint")


def test_datasets_upload_by_drag_and_drop_shows_report_and_thumbnails(
    console: Console, tmp_path: Path
) -> None:
    c = console
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(["red", "blue", "green"]):
            img = io.BytesIO()
            Image.new("RGB", (32, 32), COLORS[name]).save(img, format="PNG")
            zf.writestr(f"drop/{i}.png", img.getvalue())
        zf.writestr("drop/0.txt", "a red square")
        zf.writestr("drop/readme.md", "not an image")
    c.go("datasets")
    c.fill("#ds-up-name", "dropped")
    c.fill("#ds-trigger", "zqd")
    # a real drop event carrying the file, as the browser fires it when a ZIP is dragged onto the zone
    _js_args(
        c,
        """const bytes = Uint8Array.from(atob(arguments[0]), (ch) => ch.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "drop.zip", { type: "application/zip" }));
        document.getElementById("ds-drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));""",
        base64.b64encode(buf.getvalue()).decode(),
    )
    assert "drop.zip" in c.find("#ds-file-name").text
    c.click(c.find("#ds-up-submit"))
    report = c.wait(
        lambda: c.find("#ds-report").is_displayed() and c.find("#ds-report"), 60, "the upload report"
    )
    assert "dropped: 3 images kept, 1 skipped" in report.text, report.text
    assert "drop/readme.md" in c.find("#ds-skipped").text and "neither an image" in c.find("#ds-skipped").text

    def loaded() -> list[Any] | None:
        imgs = [i for i in c.finds("#ds-thumbs img") if i.get_attribute("data-loaded") == "1"]
        return imgs if len(imgs) == 3 else None

    thumbs = c.wait(loaded, 30, "thumbnails")
    assert all(_js_args(c, "return arguments[0].naturalWidth", t) == 32 for t in thumbs)
    assert "zqd, a red square" in report.text and report.text.count("zqd") == 3
    c.wait(
        lambda: any("dropped" in d.text for d in c.finds("#ds-list .dataset")), 30, "the dataset in the list"
    )
    c.screenshot("06b-datasets-upload")


def _js_args(c: Console, script: str, *args: object) -> object:
    return c.driver.execute_script(script, *args)


def test_system_page(console: Console) -> None:
    c = console
    c.login()
    c.go("system")
    c.wait(lambda: "Slots" in c.find("#sys-body").text, 15, "the system view")
    body = c.find("#sys-body").text
    assert "Mode: embedded" in body and "image" in body and "train" in body, body
    c.screenshot("13-system")


def test_phone_width_has_no_sideways_scroll(console: Console) -> None:
    c = console
    c.driver.set_window_size(390, 844)
    try:
        c.login()
        for page in ("generate", "training", "models", "system"):
            c.go(page)
            time.sleep(0.5)
            width = _js(c, "return document.documentElement.scrollWidth")
            assert width <= 390, (page, width)
        c.go("generate")
        c.screenshot("14-phone-generate")
    finally:
        c.driver.set_window_size(1280, 900)


def test_every_control_has_a_label(console: Console) -> None:
    c = console
    c.login()
    unlabelled = _js(
        c,
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id || e.outerHTML)",
    )
    assert unlabelled == [], unlabelled
    assert len(c.finds("label[for]")) >= 40


def test_page_requests_only_the_service(console: Console) -> None:
    urls = console.drain_network_log()
    assert any(u.endswith("/console/app.js") for u in console.requests)
    assert any("/v1/images/" in u and u.endswith("/events?after=0") for u in console.requests)
    assert any("/v1/train-jobs/" in u for u in console.requests)
    assert console.foreign_requests() == [], console.foreign_requests()
    assert urls or console.requests
