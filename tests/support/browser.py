"""Headless Chromium for the console's browser tests: Debian's ``chromium`` and ``chromedriver`` (installed by
``deploy/local/browser.sh``, which ``make test`` runs), driven by Selenium. Nothing downloads a browser."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = os.environ.get("GRISTMILL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GRISTMILL_CHROMEDRIVER", "/usr/bin/chromedriver")


@contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver, quit on exit; the test fails (never skips) when the browser is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            pytest.fail(
                f"{path} is missing: `make test` installs Debian's chromium and chromium-driver "
                "(deploy/local/browser.sh)",
                pytrace=False,
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(check: Callable[[], Any], what: str, timeout_s: float = 10.0, every_s: float = 0.02) -> Any:
    """Poll ``check`` (a browser query) until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


async def until_async(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """``until`` for a test whose event loop also serves the console: each query runs off the loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
