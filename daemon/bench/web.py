"""`kioskd bench web`: the touch page in headless Chromium, against the real daemon and broker.

Per answer: the time from the click on Ask to the first answer text on screen (the page notes
both with performance.now(); "on screen" is the task after the next animation frame), minus the
daemon's own time to first token (`done.timing.first_token_ms`, from its receipt of the
question). What is left is the page, the WebSocket, `kioskd web`, the broker both ways and the
daemon's intake and first publish. Then `kioskd web`'s RSS, and its CPU while idle with the page
open. Needs the test extra's selenium and Debian's chromium + chromium-driver.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from daemon.asker import read_retained
from daemon.bench.harness import spawn, write_config
from daemon.bench.localbroker import LocalBroker, free_port, wait_listening
from daemon.bench.results import command_line
from daemon.bench.stats import median

QUESTION = "What is MQTT?"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class WebSample:
    click_to_screen_ms: float
    click_to_dom_ms: float
    daemon_first_token_ms: float
    overhead_ms: float  # click to screen minus the daemon's first token


@dataclass(frozen=True)
class WebResult:
    command: str
    question: str
    max_tokens: int
    reps: int
    cpu_count: int | None
    samples: list[WebSample]
    click_to_screen_ms_median: float
    daemon_first_token_ms_median: float
    overhead_ms_median: float
    overhead_ms_max: float
    overhead_to_dom_ms_median: float
    web_rss_mib: float
    idle_s: float
    web_idle_cpu_percent: float


def run_web(*, reps: int, tokens: int, idle_s: float) -> WebResult:
    """A daemon and `kioskd web` on a private broker, the page in Chromium.

    RuntimeError or TimeoutError when a part does not come up.
    """
    with (
        tempfile.TemporaryDirectory(prefix="kioskd-bench-web-") as work,
        LocalBroker(free_port(), Path(work)) as broker,
    ):
        workdir = Path(work)
        prefix = f"bench/web-{secrets.token_hex(4)}"
        config = {
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
            "model": {"max_tokens": tokens},
        }
        path = str(write_config(workdir, "kioskd", config))
        port = free_port()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.append(spawn(workdir, "kioskd", ["run", "--config", path]))
            _wait_online(broker.port, prefix, processes[0])
            listen = ["--listen", f"127.0.0.1:{port}"]
            web = spawn(workdir, "web", ["web", "--config", path, *listen])
            processes.append(web)
            wait_listening(port)
            result = _measure(f"http://127.0.0.1:{port}/", web.pid, reps, tokens, idle_s)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
    return result


def _wait_online(port: int, prefix: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode}")
        status = read_retained([f"{prefix}/status"], host="127.0.0.1", port=port, timeout_s=2)
        if status.payloads.get(f"{prefix}/status") == b"online":
            return
        time.sleep(0.5)
    raise TimeoutError("the daemon did not come online")


def _measure(url: str, web_pid: int, reps: int, tokens: int, idle_s: float) -> WebResult:
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - test extra

    driver = _chromium()
    try:
        driver.get(url)
        _wait(lambda: driver.find_element(By.ID, "status").text.startswith("online"), 60)
        samples = []
        for rep in range(reps + 1):  # the first answer warms the page and the caches up
            box = driver.find_element(By.ID, "question")
            box.clear()
            box.send_keys(QUESTION)
            driver.find_element(By.ID, "ask").click()
            _wait(lambda: _state(driver) in ("done", "cancelled", "error"), 120)
            if _state(driver) != "done":
                raise RuntimeError(f"answer {rep} ended as {_state(driver)}")
            timing = driver.execute_script("return window.kioskdTimings.at(-1)")
            if rep > 0:
                samples.append(_sample(timing))
            time.sleep(0.3)
        web = psutil.Process(web_pid)
        rss_mib = web.memory_info().rss / _MIB
        time.sleep(2)  # the last answer's messages settle
        before = web.cpu_times()
        time.sleep(idle_s)
        after = web.cpu_times()
    finally:
        driver.quit()
    idle_cpu_s = (after.user + after.system) - (before.user + before.system)
    overheads = [s.overhead_ms for s in samples]
    return WebResult(
        command=command_line(),
        question=QUESTION,
        max_tokens=tokens,
        reps=reps,
        cpu_count=os.cpu_count(),
        samples=samples,
        click_to_screen_ms_median=median([s.click_to_screen_ms for s in samples], 1),
        daemon_first_token_ms_median=median([s.daemon_first_token_ms for s in samples], 1),
        overhead_ms_median=median(overheads, 1),
        overhead_ms_max=round(max(overheads), 1),
        # The same without waiting for the frame that paints the text (up to 16.7 ms at 60 Hz).
        overhead_to_dom_ms_median=median(
            [s.click_to_dom_ms - s.daemon_first_token_ms for s in samples], 1
        ),
        web_rss_mib=round(rss_mib, 1),
        idle_s=idle_s,
        web_idle_cpu_percent=round(100 * idle_cpu_s / idle_s, 3),
    )


def _sample(timing: dict[str, Any]) -> WebSample:
    click_to_screen_ms = timing["paintedMs"] - timing["clickMs"]
    first_token_ms = float(timing["done"]["timing"]["first_token_ms"])
    return WebSample(
        click_to_screen_ms=round(click_to_screen_ms, 1),
        click_to_dom_ms=round(timing["firstTextMs"] - timing["clickMs"], 1),
        daemon_first_token_ms=first_token_ms,
        overhead_ms=round(click_to_screen_ms - first_token_ms, 1),
    )


def _state(driver: Any) -> str:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    return str(driver.find_element(By.ID, "answer").get_attribute("data-state"))


def _wait(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.02)


def _chromium() -> Any:
    """Debian's headless Chromium at the Pi display's size; selenium must not fetch one."""
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    binary = shutil.which("chromium") or "/usr/bin/chromium"
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(chromedriver).exists()):
        raise RuntimeError("needs Debian's chromium and chromium-driver (scripts/setup)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--window-size=800,480", "--disable-gpu"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses root
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
