"""
Headless Chromium for tests, driven by chromedriver over plain W3C WebDriver
HTTP calls (no Selenium).  Debian: `apt-get install chromium chromium-driver`
(`scripts/browser.sh ensure` does it for `make test`).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port

#: The key under which WebDriver returns an element reference.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def find_browser() -> tuple[str, str] | None:
    """
    The paths of chromium and chromedriver, if both are installed.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    return None


class WebDriverError(Exception):
    pass


class Browser:
    """
    One chromedriver process with one headless Chromium session.
    """

    def __init__(
        self, chromium: str, driver: str, directory: Path, width: int = 390, height: int = 844
    ) -> None:
        """
        Start chromedriver and a session whose page is C{width} x C{height}
        CSS pixels, as on a phone.
        """
        self.port = free_port()
        self._log = (directory / "chromedriver.log").open("wb")
        self._driver = subprocess.Popen(
            [driver, f"--port={self.port}"], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline:
                self.quit()
                raise RuntimeError("chromedriver did not become ready within 15 s")
            time.sleep(0.05)
        args = [
            "--headless=new",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={directory / 'profile'}",
            # Root (CI containers) cannot have the sandbox; the page is our own.
            "--no-sandbox",
        ]
        session = self._call(
            "POST",
            "/session",
            {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": chromium,
                            "args": args,
                            "mobileEmulation": {
                                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2}
                            },
                        },
                    }
                }
            },
        )
        self._session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise WebDriverError(e.read().decode(errors="replace")[:1000]) from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, self._session + path, body)

    def get(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        element: str = found[ELEMENT]
        return element

    def type(self, css: str, text: str) -> None:
        self.call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.call("POST", f"/element/{self.find(css)}/click", {})

    def run(self, script: str, *args: Any) -> Any:
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("GET", "/screenshot")))

    def quit(self) -> None:
        try:
            if hasattr(self, "_session"):
                self._call("DELETE", self._session)
        finally:
            self._driver.terminate()
            try:
                self._driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()
            self._log.close()
