"""Open a local HTML file in headless Chromium and report what a reader would see.

Used to check the run report (:mod:`synrep.report`) in a real browser: console errors, images that
fail to load, the numbers shown (elements with ``data-key``), and a full-page screenshot. It drives
the system's Chromium through the system's chromedriver (Debian: ``apt-get install -y chromium
chromium-driver``) with Selenium; Selenium Manager is never asked to download anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from synrep.errors import SynrepError

INSTALL_HINT = "sudo apt-get install -y chromium chromium-driver"
MAX_SCREENSHOT_HEIGHT = 8000  # pixels; longer pages are cut there
_BROWSERS = ("chromium", "chromium-browser")
_DRIVERS = ("chromedriver",)

_IMAGES_JS = """
return Array.from(document.images).map(function (img) {
  return {src: img.getAttribute('src') || '', ok: img.complete && img.naturalWidth > 0};
});
"""
_VALUES_JS = """
return Array.from(document.querySelectorAll('[data-key]')).map(function (el) {
  return {dataset: el.getAttribute('data-dataset'), key: el.getAttribute('data-key'),
          value: el.textContent.trim(), data_value: el.getAttribute('data-value')};
});
"""
_HEIGHT_JS = ("return Math.max(document.body.scrollHeight, "
              "document.documentElement.scrollHeight);")


class BrowserUnavailable(SynrepError):
    """Chromium, chromedriver or Selenium is missing or cannot start."""


def _which(names: tuple[str, ...], fallback: str) -> str | None:
    for name in names:
        if path := shutil.which(name):
            return path
    return fallback if Path(fallback).is_file() else None


def find_browser() -> tuple[str, str]:
    """The paths of Chromium and chromedriver; raises :class:`BrowserUnavailable` naming the
    packages to install when either is missing."""
    chromium = _which(_BROWSERS, "/usr/bin/chromium")
    driver = _which(_DRIVERS, "/usr/bin/chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None]
    if missing:
        raise BrowserUnavailable(f"{' and '.join(missing)} not found on PATH; install them with "
                                 f"`{INSTALL_HINT}`")
    return chromium, driver  # type: ignore[return-value]


def render_in_browser(html_path: str | Path, *, screenshot: Path | None = None,
                      width: int = 1280, timeout: float = 60) -> dict[str, Any]:
    """Load ``html_path`` in headless Chromium and return what it saw.

    Args:
        html_path: a local HTML file.
        screenshot: where to save a full-page PNG (height capped at ``MAX_SCREENSHOT_HEIGHT``).
        width: window width in CSS pixels.
        timeout: seconds allowed for loading the page and for each script.

    Returns:
        ``console``: every browser console entry (dicts with level, message, source, timestamp);
        ``errors``: the SEVERE ones; ``images``: the number of ``<img>`` elements;
        ``broken_images``: the (truncated) ``src`` of those that did not load; ``values``: one
        ``{"dataset", "key", "value" (text shown), "data_value"}`` per element with ``data-key``;
        ``height``: the page height in pixels; ``screenshot``: the PNG written, or None.

    Raises:
        BrowserUnavailable: Chromium, chromedriver or Selenium is missing or fails to start.
        FileNotFoundError: ``html_path`` does not exist.
    """
    html_path = Path(html_path)
    if not html_path.is_file():
        raise FileNotFoundError(f"no HTML file at {html_path}")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed; pip install selenium") from None
    chromium, driver_path = find_browser()

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={width},1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Giving the driver's path skips Selenium Manager, which would otherwise download one.
    service = Service(executable_path=driver_path)
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as e:
        first = (e.msg or str(e)).strip().splitlines()[0] if (e.msg or str(e)) else type(e).__name__
        raise BrowserUnavailable(
            f"headless Chromium ({chromium}) did not start through {driver_path}: {first}; the two "
            f"must be the same version (`{INSTALL_HINT}`)") from None
    try:
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        driver.get(html_path.resolve().as_uri())  # returns after the load event
        images = driver.execute_script(_IMAGES_JS)
        values = driver.execute_script(_VALUES_JS)
        height = int(driver.execute_script(_HEIGHT_JS))
        written = None
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.set_window_size(width, min(max(height, 200), MAX_SCREENSHOT_HEIGHT))
            # the window's inner height can fall short of the size asked for: grow it by the gap
            inner = int(driver.execute_script("return window.innerHeight;"))
            want = min(height, MAX_SCREENSHOT_HEIGHT)
            if 0 < inner < want:
                driver.set_window_size(width, min(want + (want - inner), MAX_SCREENSHOT_HEIGHT
                                                  + 200))
            if not driver.save_screenshot(str(screenshot)):
                raise OSError(f"could not write the screenshot {screenshot}")
            written = screenshot
        console = driver.get_log("browser")
    finally:
        driver.quit()
    return {
        "console": console,
        "errors": [c for c in console if c.get("level") == "SEVERE"],
        "images": len(images),
        "broken_images": [img["src"][:80] for img in images if not img["ok"]],
        "values": values,
        "height": height,
        "screenshot": written,
    }
