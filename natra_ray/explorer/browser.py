"""Drive the explorer page in a real headless browser (Debian's ``chromium`` + ``chromedriver``,
through Selenium): used by the tests and by ``jobs/explore.py --screenshot``.

Selenium is a dev dependency, imported lazily; no browser build is ever downloaded (the system
chromium and chromedriver are passed explicitly, so Selenium Manager stays out of it).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"


class BrowserUnavailable(RuntimeError):
    """No headless browser can be started here; the message says what to install."""


def find_browser() -> tuple[str, str]:
    """(chromium binary, chromedriver binary) or ``BrowserUnavailable``."""
    binary = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = [n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None]
        raise BrowserUnavailable(f"{' and '.join(missing)} not found on PATH; install with: {INSTALL_HINT}")
    return binary, driver


def chrome(width: int = 1440, height: int = 900) -> Any:
    """A headless Chromium WebDriver (caller quits it)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable(f"selenium is not installed; {INSTALL_HINT}") from None
    binary, driver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except WebDriverException as e:
        raise BrowserUnavailable(f"chromium did not start: {str(e).splitlines()[0]}") from None


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", poll: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; ``TimeoutError`` naming ``what``."""
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        try:
            last = cond()
        except Exception as e:  # noqa: BLE001 - stale elements etc. while the page updates
            last = e
        else:
            if last:
                return last
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def page_idle(driver: Any, edits_at_least: int = 0) -> bool:
    body = driver.find_element("tag name", "body")
    return (body.get_attribute("data-state") == "idle"
            and int(body.get_attribute("data-edits") or 0) >= edits_at_least)


def edits_done(driver: Any) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-edits") or 0)


def open_page(driver: Any, url: str, timeout: float = 60.0) -> None:
    driver.get(url)
    wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-ready") == "1",
             timeout, "the page to load the pipeline")


def pick_dataset_image(driver: Any, index: int, timeout: float = 120.0) -> None:
    """Click gallery image ``index``; wait until its inversion and first edit are shown."""
    before = edits_done(driver)
    driver.find_element("css selector", f"#gallery button[data-index='{index}']").click()
    wait_for(lambda: page_idle(driver, before + 1), timeout, f"dataset image {index} to be inverted and rendered")


def move_slider(driver: Any, direction: int, strength: float, timeout: float = 60.0) -> None:
    """Move direction ``direction``'s slider with the keyboard (real input events, one per step
    of 0.1) until it reads ``strength``; wait until the last edit is rendered."""
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element("css selector", f"input.strength[data-index='{direction}']")
    steps = int(round((strength - float(slider.get_attribute("value"))) / 0.1))
    before = edits_done(driver)
    slider.send_keys(*([Keys.ARROW_RIGHT if steps > 0 else Keys.ARROW_LEFT] * abs(steps)))
    wait_for(lambda: abs(float(slider.get_attribute("value")) - strength) < 1e-6 and page_idle(driver, before + 1),
             timeout, f"direction {direction} at strength {strength} to be rendered")


def screenshot(url: str, out: str | Path, dataset_index: Optional[int] = 0, direction: int = 0,
               strength: float = 2.0, start: Optional[int] = None, end: Optional[int] = None) -> Path:
    """Open the page, pick a dataset image, set the layer range, move one slider, save a PNG."""
    from selenium.webdriver.support.ui import Select

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    driver = chrome()
    try:
        open_page(driver, url)
        if start is not None:
            Select(driver.find_element("id", "layer-start")).select_by_value(str(start))
        if end is not None:
            Select(driver.find_element("id", "layer-end")).select_by_value(str(end))
        if dataset_index is not None:
            pick_dataset_image(driver, dataset_index)
            move_slider(driver, direction, strength)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1440, max(700, int(height) + 20))
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    return out
