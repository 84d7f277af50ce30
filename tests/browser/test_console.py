"""The web console in a real headless Chromium against a real `hdm serve`. Tests run in file order on one browser
session; each leaves a screenshot of its page in var/screenshots/. The last test checks Chrome's performance log:
every request the page made went to the service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from console_page import KEY, Console
from PIL import Image

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
    c.select("#gal-status", "cancelled")
    c.find("#gal-filter button").click()
    c.wait(
        lambda: {e.text for e in c.finds("#gal-list .card .badge")} == {"cancelled"}, 20, "the status filter"
    )
    c.select("#gal-status", "succeeded")
    c.find("#gal-filter button").click()
    c.wait(lambda: {e.text for e in c.finds("#gal-list .card .badge")} == {"succeeded"}, 20, "succeeded only")
    with c.client() as api:
        tiny = next(m["id"] for m in api.get("/v1/models").json()["data"] if m["name"] == "tiny")
    c.select("#gal-status", "")
    c.select("#gal-model", tiny)
    c.find("#gal-filter button").click()
    c.wait(lambda: len(c.finds("#gal-list .card")) == 2, 20, "both jobs (made with the default model, tiny)")
    c.select("#gal-status", "succeeded")
    c.find("#gal-filter button").click()
    c.wait(lambda: len(c.finds("#gal-list .card")) == 1, 20, "succeeded and tiny")
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
    sample = c.wait(lambda: c.finds("#tj-samples .sample"), 120, "a sample")[0]
    assert sample.text.startswith("step-") and sample.text.endswith(".png")
    stats = c.find("#tj-stats").text
    assert "images/s" in stats and "running" in stats, stats
    c.screenshot("08-training-job")
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


def test_models_and_system_pages(console: Console) -> None:
    c = console
    c.login()
    c.go("models")
    rows = c.wait(lambda: c.finds("#models-list tr[data-id]"), 15, "models")
    assert any("tiny" in r.text for r in rows)
    c.screenshot("09-models")
    trained = next(r.get_attribute("data-id") for r in rows if "train_" in r.text)
    c.go("gallery")
    c.select("#gal-model", trained)
    c.find("#gal-filter button").click()
    c.wait(lambda: "No image jobs match." in c.find("#gal-list").text, 20, "no job made with the checkpoint")
    c.go("system")
    c.wait(lambda: "Slots" in c.find("#sys-body").text, 15, "the system view")
    body = c.find("#sys-body").text
    assert "Mode: embedded" in body and "image" in body and "train" in body, body
    c.screenshot("10-system")


def test_phone_width_has_no_sideways_scroll(console: Console) -> None:
    c = console
    c.driver.set_window_size(390, 844)
    try:
        c.login()
        for page in ("generate", "training", "system"):
            c.go(page)
            time.sleep(0.5)
            width = _js(c, "return document.documentElement.scrollWidth")
            assert width <= 390, (page, width)
        c.go("generate")
        c.screenshot("11-phone-generate")
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
