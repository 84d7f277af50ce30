"""The console under test: the service's address, one Chromium session, helpers to drive the page, and every URL
the browser requested (from Chrome's performance log)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[2]
KEY = "console-key-" + secrets.token_hex(8)
ADMIN_KEY = "console-admin-" + secrets.token_hex(8)
SCREENSHOTS = ROOT / "var" / "screenshots"


class Console:
    """The service plus one Chromium session on it, and the requests the browser made (performance log)."""

    def __init__(self, base: str, data_root: Path, models_dir: Path, driver: Any) -> None:
        self.base, self.data_root, self.models_dir, self.driver = base, data_root, models_dir, driver
        self.requests: list[str] = []

    def client(self, key: str = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def drain_network_log(self) -> list[str]:
        """Every URL Chrome asked for since the last call (Network.requestWillBeSent), kept in self.requests."""
        urls = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        self.requests += urls
        return urls

    def open(self, hash_: str = "") -> None:
        self.driver.get(f"{self.base}/{hash_}")

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, cond: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except Exception as exc:  # element not there yet, stale after a re-render
                last_exc = exc
            time.sleep(0.1)
        alerts = [a.text for a in self.finds("[role=alert]") if a.is_displayed()]
        status = self.find("#gen-status").text
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what or cond}: {last_exc}; "
            f"alerts on the page: {alerts}; generate status: {status!r}"
        )

    def login(self, key: str = KEY) -> None:
        self.open()
        self.wait(
            lambda: self.find("#key-panel").is_displayed() or self.find("#nav").is_displayed(), 30, "start"
        )
        if self.find("#key-panel").is_displayed():
            from selenium.webdriver.common.keys import Keys

            self.find("#api-key").send_keys(key + Keys.ENTER)  # the keyboard submits the form
            self.wait(lambda: self.find("#nav").is_displayed(), 30, "the console after the key")

    def go(self, page: str) -> None:
        self.find(f'#nav a[data-page="{page}"]').click()
        self.wait(lambda: self.find(f"#page-{page}").is_displayed(), 10, f"page {page}")

    def fill(self, css: str, value: object) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(str(value))

    def select(self, css: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find(css)).select_by_value(value)

    def click(self, element: Any) -> None:
        """Clicks after scrolling the element to the middle (WebDriver scrolls it to the top, under the sticky bar)."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def accept_confirm(self) -> str:
        """Accepts the page's confirm() dialog and returns its text."""
        alert = self.wait(lambda: self.driver.switch_to.alert, 10, "a confirm dialog")
        text = str(alert.text)
        alert.accept()
        return text

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def foreign_requests(self) -> list[str]:
        origin = urlsplit(self.base)
        bad = []
        for url in self.requests:
            parts = urlsplit(url[5:] if url.startswith("blob:") else url)  # blob:http://host:port/uuid
            if parts.scheme == "data":
                continue
            if (parts.scheme, parts.netloc) != (origin.scheme, origin.netloc):
                bad.append(url)
        return bad
