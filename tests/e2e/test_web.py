"""The kiosk screen in a real browser: headless Chromium, `kioskd web`, the real daemon and broker.

Only the hardware is faked (a fixture /sys thermal zone, a fake vcgencmd).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import browser
from tests.support.daemon import REPO, Broker, DaemonFactory
from tests.support.mqtt_client import TestClient
from tests.support.web_service import WebFactory, web

__all__ = ["web"]  # the fixture

if reason := browser.available():
    pytest.skip(reason, allow_module_level=True)

from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

# A real browser beside the daemon in every test.
pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VCGENCMD_OK = str(FIXTURES / "bin" / "vcgencmd-ok")
# Screenshots for people to look at (bench-results/ is not committed).
SCREENSHOTS = Path(os.environ.get("KIOSKD_SCREENSHOTS", REPO / "bench-results" / "web"))
# With the slow_tokens hooks (every answer this long, 40 ms more a token): long enough to stop,
# and to show busy and a queue position while another terminal's answer runs.
LONG_ANSWER_TOKENS = 100
# With this seed the base model's answer to "What is MQTT?" fits the screenshot (on this CPU).
SHORT_ANSWER_TOKENS = 25
SEED = 4


def kiosk_config(sys_root: Path, max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "model": {"max_tokens": max_tokens, "threads": 1, "seed": SEED},
        "telemetry": {
            "interval_s": 0.3,
            "sys_root": str(sys_root),
            "vcgencmd": [VCGENCMD_OK, "get_throttled"],
        },
        **extra,
    }


def set_temp_c(root: Path, temp_c: float) -> None:
    (root / "class" / "thermal" / "thermal_zone0" / "temp").write_text(f"{round(temp_c * 1000)}\n")


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "sys" / "pi5", root)
    set_temp_c(root, 50)
    return root


@pytest.fixture
def page() -> Iterator[WebDriver]:
    driver = browser.chromium(800, 480)
    yield driver
    driver.quit()


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def state(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "answer").get_attribute("data-state"))


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ask(driver: WebDriver, question: str) -> None:
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()


def watch_answer(
    driver: WebDriver, until: set[str], timeout_s: float = 60.0
) -> list[tuple[str, str]]:
    """(data-state, answer text) as they change, until one of the states in `until`."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = (state(driver), text(driver, "answer"))
        if not seen or seen[-1] != now:
            seen.append(now)
        if now[0] in until:
            return seen
        time.sleep(0.03)
    raise AssertionError(f"answer never reached {until}; saw {seen}")


def test_page_streams_stops_queues_and_says_busy(
    start_daemon: DaemonFactory,
    web: WebFactory,
    page: WebDriver,
    client: TestClient,
    sys_root: Path,
    slow_tokens: dict[str, str],
) -> None:
    config = kiosk_config(sys_root, LONG_ANSWER_TOKENS, queue={"capacity": 1})
    daemon = start_daemon(config, env=slow_tokens)
    page.get(web(daemon.config_path).url)
    wait_until(lambda: "CPU 50 °C" in text(page, "status"), "the status bar's temperature")
    status = text(page, "status")
    assert status.startswith("online"), status
    assert "not throttled" in status
    assert state(page) == "idle"
    assert page.execute_script("return document.documentElement.lang === navigator.language")

    # Ask: text arrives while the answer is streaming, then it is done.
    ask(page, "What is MQTT?")
    seen = watch_answer(page, {"done", "error"})
    streamed = [answer for st, answer in seen if st == "streaming" and answer]
    assert len(set(streamed)) >= 2, f"the text should grow while streaming: {seen}"
    assert seen[-1][0] == "done", seen
    assert seen[-1][1].startswith(streamed[0])

    # Stop a long answer: it ends as cancelled, with the text so far.
    ask(page, "Tell me a long story about a factory.")
    watch_answer(page, {"streaming"})
    page.find_element(By.ID, "stop").click()
    seen = watch_answer(page, {"cancelled", "done", "error"})
    assert seen[-1][0] == "cancelled", seen
    assert seen[-1][1]
    assert "Stopped" in text(page, "notice")

    # Another terminal keeps the kiosk busy: one answer running, one waiting (capacity 1).
    for request_id in ("other-1", "other-2"):
        client.subscribe(daemon.topic(f"answer/{request_id}"))
        client.publish(daemon.topic("ask"), {"id": request_id, "question": "Count to a hundred."})
    client.wait_for(
        lambda received: any(r.topic.endswith("other-2") for r in received), timeout_s=30
    )
    ask(page, "Are you busy?")
    seen = watch_answer(page, {"error", "done", "cancelled"})
    assert seen[-1][0] == "error", seen
    assert re.search(r"The kiosk is busy, try again in \d+ s\.", seen[-1][1]), seen[-1][1]

    # With room in the queue the page waits in line, then streams once the other answer ends.
    client.publish(daemon.topic("cancel"), {"id": "other-2"})
    client.stream(daemon.topic("answer/other-2"))
    ask(page, "Who is next?")
    watch_answer(page, {"queued"})
    wait_until(lambda: "position 1" in text(page, "answer"), "the queue position")
    client.publish(daemon.topic("cancel"), {"id": "other-1"})
    watch_answer(page, {"streaming"})
    page.find_element(By.ID, "stop").click()
    assert watch_answer(page, {"cancelled", "done", "error"})[-1][0] == "cancelled"


def test_page_shows_offline_and_overheated_and_recovers_without_reload(
    start_daemon: DaemonFactory,
    web: WebFactory,
    page: WebDriver,
    broker: Broker,
    sys_root: Path,
) -> None:
    daemon = start_daemon(kiosk_config(sys_root, SHORT_ANSWER_TOKENS))
    service = web(daemon.config_path)
    page.get(service.url)
    wait_until(lambda: text(page, "status").startswith("online"), "online")
    page.execute_script("window.sameDocument = true")

    # A crash: the broker publishes the daemon's last will.
    daemon.process.kill()
    daemon.process.wait(10)
    wait_until(lambda: text(page, "status").startswith("offline"), "offline in the status bar")
    ask(page, "Anyone there?")
    seen = watch_answer(page, {"error", "done"})
    assert seen[-1] == ("error", "The kiosk is offline. Ask again when the status bar says online.")

    # Back, but too hot: the status bar says so, and a question gets the words for it.
    set_temp_c(sys_root, 90)
    start_daemon(kiosk_config(sys_root, SHORT_ANSWER_TOKENS), name="kioskd-hot")
    wait_until(lambda: "CPU 90 °C · throttled" in text(page, "status"), "the hot kiosk's status")
    assert text(page, "status").startswith("online")
    ask(page, "Why so hot?")
    seen = watch_answer(page, {"error", "done"})
    assert seen[-1][0] == "error", seen
    assert re.search(r"too hot.*[Tt]ry again in \d+ s\.", seen[-1][1]), seen[-1][1]

    # Cooled down: the same page, never reloaded, gets an answer again.
    set_temp_c(sys_root, 50)
    wait_until(lambda: "· ready ·" in text(page, "status"), "the kiosk ready again")
    ask(page, "What is MQTT?")
    seen = watch_answer(page, {"done", "error"})
    assert seen[-1][0] == "done", seen
    assert seen[-1][1]
    wait_until(lambda: "· ready ·" in text(page, "status"), "the kiosk ready after answering")
    save_screenshots(page)

    # The web service itself restarts: the page says so, then reconnects on its own.
    assert service.stop() == 0
    wait_until(lambda: "no connection" in text(page, "status"), "the page noticing")
    assert text(page, "status").startswith("offline")
    service.start()
    wait_until(lambda: text(page, "status").startswith("online"), "the page reconnecting")
    ask(page, "Still there?")
    assert watch_answer(page, {"done", "error"})[-1][0] == "done"
    assert page.execute_script("return window.sameDocument === true"), "the page was reloaded"


def save_screenshots(driver: WebDriver) -> None:
    """The page at the Pi's 7" display size and at full HD, for people to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in ((1920, 1080), (800, 480)):
        browser.set_viewport(driver, width, height)
        wait_until(
            lambda w=width: driver.execute_script("return window.innerWidth") == w,  # type: ignore[misc]
            f"a {width} px wide page",
        )
        layout = driver.execute_script(
            """const ids = ["question", "ask", "stop", "new", "answer"];
            const answer = document.getElementById("answer");
            return {
              smallest_px: Math.min(...ids.map((id) => {
                const box = document.getElementById(id).getBoundingClientRect();
                return Math.min(box.width, box.height);
              })),
              page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
              answer_font_px: parseFloat(getComputedStyle(answer).fontSize),
            };"""
        )
        # Touch targets of at least 48 px, nothing off screen, type readable from a step away.
        assert layout["smallest_px"] >= 48, layout
        assert layout["page"] == [width, height], layout
        assert layout["answer_font_px"] >= 18, layout
        path = SCREENSHOTS / f"kiosk-screen-{width}x{height}.png"
        assert driver.save_screenshot(str(path)), path
        assert path.stat().st_size > 10_000, "a blank page would be tiny"


def test_page_follow_ups_stay_in_one_conversation_until_new(
    start_daemon: DaemonFactory,
    web: WebFactory,
    page: WebDriver,
    client: TestClient,
    sys_root: Path,
) -> None:
    daemon = start_daemon(kiosk_config(sys_root, 24))
    client.subscribe(daemon.topic("answer/+"))
    page.get(web(daemon.config_path).url)
    wait_until(lambda: text(page, "status").startswith("online"), "online")

    def turn_of_next_answer(question: str) -> dict[str, object]:
        count = len(client.received)
        ask(page, question)
        assert watch_answer(page, {"done", "error", "cancelled"})[-1][0] == "done"
        dones = client.wait_for(
            lambda got: any(r.json()["type"] == "done" for r in got[count:]), timeout_s=30
        )
        done = next(r.json() for r in dones[count:] if r.json()["type"] == "done")
        conversation = done["conversation"]
        assert isinstance(conversation, dict)
        return conversation

    first = turn_of_next_answer("What is a PLC?")
    assert (first["turn"], first["new"]) == (1, True)
    follow_up = turn_of_next_answer("And what does it control?")
    assert (follow_up["turn"], follow_up["new"]) == (2, False)
    assert follow_up["id"] == first["id"], "the page sent its conversation_id again"
    page.find_element(By.ID, "new").click()
    fresh = turn_of_next_answer("What is a relay?")
    assert (fresh["turn"], fresh["new"]) == (1, True)
    assert fresh["id"] != first["id"]
