"""Debian's headless Chromium through chromium-driver, for the kiosk screen's tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

# Debian's packages (scripts/setup installs them); selenium must not fetch a browser of its own.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> str | None:
    """Why no browser test can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing; run scripts/setup (apt: chromium chromium-driver)"
    return None


def chromium(width: int, height: int, *, language: str = "en-US") -> webdriver.Chrome:
    """A headless Chromium whose page area is `width` x `height` CSS pixels."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.add_argument("--headless=new")
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--lang={language}")
    options.add_argument("--disable-gpu")
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument("--no-first-run")
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    if os.geteuid() == 0:
        # Chromium's own sandbox refuses to run as root (CI runs as root).
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Make the page area exactly `width` x `height`, as on a screen in kiosk mode."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
