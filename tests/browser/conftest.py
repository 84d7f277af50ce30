"""Browser tests: headless Chromium (Debian's chromium + chromium-driver, through Selenium) against a real
`hdm serve` (embedded mode: SQLite, the jobs table as queue, one worker) that requires an API key.

The tiny pixel-space model and toy text encoder are the service tests' `assets` fixture; `Stack`, `free_port` and
`stop_group` come from tests/service/service_stack.py. Screenshots go to var/screenshots/ (gitignored)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_TESTS = ROOT / "tests" / "service"
sys.path.insert(0, str(SERVICE_TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from console_page import ADMIN_KEY, KEY, SCREENSHOTS, Console  # noqa: E402
from service_stack import Stack, free_port, stop_group  # noqa: E402

_spec = importlib.util.spec_from_file_location("service_conftest", SERVICE_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_service_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_service_conftest)
assets = _service_conftest.assets  # the tiny model + toy text encoder fixture, shared rather than copied

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="session")
def served(
    tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]
) -> Iterator[tuple[str, Path, Path]]:
    """`hdm serve` (API + embedded worker, SQLite) with a required API key and an admin key."""
    tmp = tmp_path_factory.mktemp("console")
    env = {
        "HDM_DATABASE_URL": f"sqlite:///{tmp / 'hdm.db'}",
        "HDM_BROKER_URL": "db://",
        "HDM_DATA_ROOT": str(tmp / "data"),
        "HDM_MODELS_DIR": str(assets["models"]),
        "HDM_OUTPUTS_DIR": str(tmp / "out"),
        "HDM_RUNS_DIR": str(tmp / "runs"),
        "HDM_TEXT_ENCODER": str(assets["te"]),
        "HDM_IMAGE_MIN_SIZE": "32",
        "HDM_API_KEYS": KEY,
        "HDM_ADMIN_KEYS": ADMIN_KEY,
        "HDM_WEBHOOK_SECRET": "whsec-console-test",
        "HDM_SLOTS": "0",
        "HDM_DEVICE": "cpu",
        "HDM_CPU_THREADS": "1",
        "HDM_MAINTENANCE_INTERVAL_S": "0.5",
    }
    (tmp / "data").mkdir()
    stack = Stack(env, tmp, KEY)
    port = free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=stack.env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("hdm serve did not become ready: " + log.read_text())
            time.sleep(0.2)
        yield base, tmp / "data", assets["models"]
    finally:
        stop_group(proc, timeout=30)


@pytest.fixture(scope="session")
def console(served: tuple[str, Path, Path]) -> Iterator[Console]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are required: run `bash scripts/browser.sh` (make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    try:
        yield Console(*served, driver)
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _network_log(console: Console) -> Iterator[None]:
    """Reads Chrome's performance log after every test, so no entry is lost to its buffer."""
    yield
    console.drain_network_log()
