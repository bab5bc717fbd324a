"""P/health on a real daemon over a real broker, with fixture /sys trees for the hardware."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import exitcodes
from daemon.discovery import discovery_messages
from tests.support.daemon import Broker, DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VCGENCMD_OK = str(FIXTURES / "bin" / "vcgencmd-ok")
VCGENCMD_THROTTLED = str(FIXTURES / "bin" / "vcgencmd-throttled")

HEALTH_KEYS = {
    "ts",
    "device",
    "state",
    "uptime_s",
    "cpu",
    "memory",
    "thermal",
    "model",
    "queue",
    "counters",
    "last",
    "conversations",
    "fleet",
}
SECTION_KEYS = {
    "cpu": {"percent", "per_core", "freq_mhz", "load"},
    "memory": {"total_mb", "available_mb", "rss_mb"},
    "thermal": {"cpu_c", "zones", "throttled"},
    "model": {"name", "threads", "ctx"},
    "queue": {"depth", "capacity"},
    "counters": {"answered", "errors", "rejected", "cancelled"},
    "last": {"tokens_per_s", "first_token_ms"},
    "conversations": {"active", "state_mb"},
}


def _health(
    client: TestClient, topic: str, predicate: Any, timeout_s: float = 30
) -> dict[str, Any]:
    """The first health message on `topic` that satisfies `predicate`."""

    def matching(received: list[Any]) -> list[dict[str, Any]]:
        return [r.json() for r in received if r.topic == topic and predicate(r.json())]

    client.wait_for(lambda received: bool(matching(received)), timeout_s)
    return matching(client.received)[0]


@pytest.mark.parametrize(
    ("shape", "vcgencmd", "cpu_c", "unknown_zone", "freq_mhz"),
    [
        ("pi5", [VCGENCMD_OK, "get_throttled"], 52.7, None, 2400),
        ("jetson_orin", None, 47.3, "cv0-thermal", 1510),
        ("x86", None, 51.0, "SEN1", None),
    ],
)
def test_health_has_every_field_on_each_board_shape(
    start_daemon: DaemonFactory,
    client: TestClient,
    shape: str,
    vcgencmd: list[str] | None,
    cpu_c: float,
    unknown_zone: str | None,
    freq_mhz: int | None,
) -> None:
    root = FIXTURES / "sys" / shape
    daemon = start_daemon(
        {
            "telemetry": {"interval_s": 0.3, "sys_root": str(root), "vcgencmd": vcgencmd},
            "mqtt": {"device_id": f"{shape}-box"},
            "model": {"threads": 1},
        }
    )
    client.subscribe(daemon.topic("answer/h1"))
    client.publish(daemon.topic("ask"), {"id": "h1", "question": "Hi", "max_tokens": 4})
    client.stream(daemon.topic("answer/h1"))
    client.subscribe(daemon.topic("health"))
    health = _health(
        client,
        daemon.topic("health"),
        lambda h: h["state"] == "ready" and h["counters"]["answered"] == 1,
    )
    assert set(health) == HEALTH_KEYS
    for section, keys in SECTION_KEYS.items():
        assert set(health[section]) == keys, section
    assert health["device"] == f"{shape}-box"
    assert health["uptime_s"] >= 0
    assert abs(health["ts"] - time.time()) < 60
    thermal = health["thermal"]
    assert thermal["cpu_c"] == pytest.approx(cpu_c, abs=0.01)
    zone_types = {p.read_text().strip() for p in (root / "class" / "thermal").glob("*/type")}
    assert {
        name.split("_")[0] if name.startswith("acpitz_") else name for name in thermal["zones"]
    } == zone_types
    if unknown_zone is not None:
        assert thermal["zones"][unknown_zone] is None, "sentinel readings are unknown, not cold"
    assert health["cpu"]["freq_mhz"] == freq_mhz
    if vcgencmd is None:
        assert thermal["throttled"] == {"now": None, "since_boot": None, "flags": []}
    else:
        assert thermal["throttled"] == {"now": False, "since_boot": False, "flags": []}
    assert health["model"] == {"name": "gemma-3-270m-q4_k_m", "threads": 1, "ctx": 2048}
    assert health["queue"] == {"depth": 0, "capacity": 8}
    assert health["last"]["tokens_per_s"] is None or health["last"]["tokens_per_s"] > 0
    assert health["last"]["first_token_ms"] > 0
    assert health["memory"]["rss_mb"] > 50
    assert len(health["cpu"]["per_core"]) >= 1
    assert len(health["cpu"]["load"]) == 3
    retained = TestClient(client_port(client))
    try:
        retained.subscribe(daemon.topic("health"))
        assert retained.wait_for(bool, 5)[0].retain
    finally:
        retained.close()


def client_port(client: TestClient) -> int:
    return int(client._client.port)


def _set_temp(root: Path, temp_c: float) -> None:
    (root / "class" / "thermal" / "thermal_zone0" / "temp").write_text(f"{round(temp_c * 1000)}\n")


def test_thermal_back_off_sequence(
    start_daemon: DaemonFactory, client: TestClient, tmp_path: Path, slow_tokens: dict[str, str]
) -> None:
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "sys" / "pi5", root)
    _set_temp(root, 50)
    daemon = start_daemon(
        {
            "telemetry": {
                "interval_s": 0.3,
                "sys_root": str(root),
                "vcgencmd": [VCGENCMD_OK, "get_throttled"],
            },
            "model": {"threads": 3},
            "thermal": {"soft_limit_c": 75, "hard_limit_c": 82, "resume_below_c": 70},
        },
        env=slow_tokens,
    )
    health_topic = daemon.topic("health")
    client.subscribe(health_topic)
    client.subscribe(daemon.topic("answer/+"))
    _health(client, health_topic, lambda h: h["state"] == "ready" and h["model"]["threads"] == 3)

    # Soft limit: one thread fewer per interval, down to 1, shown as throttled.
    _set_temp(root, 77)
    _health(client, health_topic, lambda h: h["model"]["threads"] == 2)
    hot = _health(client, health_topic, lambda h: h["model"]["threads"] == 1)
    assert hot["state"] == "throttled"
    assert hot["thermal"]["cpu_c"] == 77.0

    # A running answer keeps going when the hard limit is crossed; queued ones wait.
    client.publish(daemon.topic("ask"), {"id": "running", "question": "x", "max_tokens": 40})
    client.wait_for(lambda got: any(r.topic.endswith("/running") for r in got))
    client.publish(daemon.topic("ask"), {"id": "queued", "question": "x", "max_tokens": 3})
    _set_temp(root, 85)
    client.wait_for(
        lambda got: any(r.topic.endswith("/running") and r.json()["type"] == "done" for r in got),
        timeout_s=30,
    )
    client.publish(daemon.topic("ask"), {"id": "refused", "question": "x"})
    refused = assert_well_formed(client.stream(daemon.topic("answer/refused")), "refused")
    assert refused["code"] == "overheated"
    assert refused["retry_after_s"] > 0
    time.sleep(1.0)  # several intervals: the queued request must not have started
    assert [r.json()["type"] for r in client.on_topic(daemon.topic("answer/queued"))] == ["queued"]

    # Hysteresis: between resume and soft limit nothing changes...
    _set_temp(root, 72)
    time.sleep(1.0)
    assert [r.json()["type"] for r in client.on_topic(daemon.topic("answer/queued"))] == ["queued"]
    # ...below resume the queued question runs and threads come back one per interval.
    _set_temp(root, 60)
    queued = assert_well_formed(client.stream(daemon.topic("answer/queued")), "queued")
    assert queued["type"] == "done"
    recovered = _health(client, health_topic, lambda h: h["model"]["threads"] == 3)
    assert recovered["state"] in ("ready", "busy")
    log = daemon.log()
    assert "soft limit" in log
    assert "hard limit" in log


def test_pi_firmware_throttling_reduces_threads(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(
        {
            "telemetry": {
                "interval_s": 0.3,
                "sys_root": str(FIXTURES / "sys" / "pi5"),
                "vcgencmd": [VCGENCMD_THROTTLED, "get_throttled"],
            },
            "model": {"threads": 2},
        }
    )
    client.subscribe(daemon.topic("health"))
    health = _health(client, daemon.topic("health"), lambda h: h["model"]["threads"] == 1)
    throttled = health["thermal"]["throttled"]
    assert throttled["now"] is True
    assert "under_voltage_now" in throttled["flags"]
    assert health["state"] == "throttled"


def test_health_arrives_every_interval_while_answering(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(
        {"telemetry": {"interval_s": 1}, "model": {"max_tokens": 512}},
        env={"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "15"},
    )
    client.subscribe(daemon.topic("health"))
    client.subscribe(daemon.topic("answer/long"))
    client.publish(daemon.topic("ask"), {"id": "long", "question": "x", "max_tokens": 300})
    client.stream(daemon.topic("answer/long"), timeout_s=120)
    answer = client.on_topic(daemon.topic("answer/long"))
    started, ended = answer[0].arrived_monotonic, answer[-1].arrived_monotonic
    assert ended - started > 4, "the answer must run long enough to see several intervals"
    during = [
        r
        for r in client.on_topic(daemon.topic("health"))
        if started - 1.5 <= r.arrived_monotonic <= ended + 1.5
    ]
    arrivals = [r.arrived_monotonic for r in during]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] <= started + 1.5
    assert arrivals[-1] >= ended - 1.5
    assert max(gaps) <= 1.5, gaps
    assert any(r.json()["state"] == "busy" for r in during)


def test_home_assistant_discovery_and_rediscovery(
    start_daemon: DaemonFactory, client: TestClient, prefix: str, model_path: Path
) -> None:
    ha_prefix = f"{prefix}-ha"
    client.subscribe(f"{ha_prefix}/#")
    daemon = start_daemon(
        {
            "homeassistant": {"enabled": True, "prefix": ha_prefix},
            "telemetry": {"interval_s": 2},
            "mqtt": {"device_id": "line-7"},
        }
    )
    expected = dict(
        discovery_messages(
            device_id="line-7",
            ha_prefix=ha_prefix,
            health_topic=daemon.topic("health"),
            status_topic=daemon.topic("status"),
            interval_s=2,
            # HA shows the loaded GGUF as the device's model.
            model_name=model_path.stem.lower(),
            sw_version="0.1.0",
        )
    )
    configs = client.wait_for(lambda got: len(got) >= len(expected))
    first_round = {r.topic: json.loads(r.payload) for r in configs}
    assert first_round == expected
    assert all(r.retain or r.topic in expected for r in configs)
    for payload in first_round.values():
        assert payload["availability_topic"] == daemon.topic("status")
        assert payload["expire_after"] == 6
    # Home Assistant restarts and says so: every config comes again.
    count = len(client.received)
    client.publish(f"{ha_prefix}/status", "online")
    again = client.wait_for(lambda got: len(got) >= count + 1 + len(expected))
    resent = {r.topic for r in again[count:] if r.topic.endswith("/config")}
    assert resent == set(expected)


def test_kioskd_status_prints_a_table(start_daemon: DaemonFactory, broker: Broker) -> None:
    daemon = start_daemon(
        {
            "telemetry": {
                "interval_s": 0.5,
                "sys_root": str(FIXTURES / "sys" / "x86"),
                "vcgencmd": None,
            }
        }
    )
    time.sleep(1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "status",
            "--port",
            str(broker.port),
            "--prefix",
            daemon.prefix,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "online, state ready" in result.stdout
    assert "x86_pkg_temp 51.0 C" in result.stdout
    assert "SEN1 -" in result.stdout
    assert "Chats     0 conversations kept, 0.0 MiB of model state" in result.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "status",
            "--port",
            str(broker.port),
            "--prefix",
            "nobody/here",
            "--timeout-s",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == exitcodes.NO_KIOSK
    assert "nothing is retained on nobody/here/status" in missing.stderr
