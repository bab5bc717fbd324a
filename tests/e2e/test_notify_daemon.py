"""sd_notify from the real daemon: a unix datagram socket stands in for systemd (not PID 1 here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import exitcodes
from tests.support.daemon import DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed
from tests.support.notify_socket import NotifySocket


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket.open(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def test_ready_only_after_the_model_is_warm_then_watchdog_and_stopping(
    start_daemon: DaemonFactory, client: TestClient, notify_socket: NotifySocket, prefix: str
) -> None:
    client.subscribe(f"{prefix}/status")
    daemon = start_daemon(
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"},
        wait_online=False,
    )
    ready_at = notify_socket.wait_for("READY=1")
    ready = next(m for _t, m in notify_socket.messages if "READY=1" in m)
    assert "STATUS=ready: gemma-3-270m-q4_k_m, " in ready
    # Everything a client needs was in place before READY: model warm, online retained.
    assert "model warm" in daemon.log()
    client.wait_status(f"{prefix}/status", b"online", timeout_s=5)
    online_at = next(r.arrived_monotonic for r in client.received if r.payload == b"online")
    assert online_at <= ready_at + 0.5
    statuses = [m for _t, m in notify_socket.messages if m.startswith("STATUS=")]
    assert any(m.startswith("STATUS=loading:") for m in statuses), statuses
    # WATCHDOG_USEC=1 s: a ping every 0.5 s while idle.
    time.sleep(3.2)
    pings = notify_socket.pings_between(ready_at, ready_at + 3.0)
    assert 5 <= len(pings) <= 8, pings
    assert daemon.terminate() == exitcodes.OK
    stopping_at = notify_socket.wait_for("STOPPING=1", timeout_s=5)
    assert stopping_at > ready_at


def test_watchdog_pings_stop_while_generation_is_stalled(
    start_daemon: DaemonFactory,
    client: TestClient,
    notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    stall = tmp_path / "stall"
    daemon = start_daemon(
        {"watchdog": {"stall_s": 1}},
        env={
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": "600000",
            "KIOSKD_TEST_STALL_FILE": str(stall),
            "KIOSKD_TEST_IGNORE_EOS": "1",
        },
    )
    notify_socket.wait_for("READY=1")
    client.subscribe(daemon.topic("answer/stuck"))
    stall.touch()  # generation blocks after its first token until this file is gone
    client.publish(daemon.topic("ask"), {"id": "stuck", "question": "x", "max_tokens": 10})
    client.wait_for(lambda got: any(r.json()["type"] == "chunk" for r in got))
    stalled_at = time.monotonic()
    time.sleep(3.0)
    # Pings may continue up to stall_s (1 s) plus one interval (0.3 s); then they must stop.
    assert notify_socket.pings_between(stalled_at + 1.5, stalled_at + 3.0) == []
    assert "watchdog" in daemon.log().lower()
    stall.unlink()
    done = assert_well_formed(client.stream(daemon.topic("answer/stuck")), "stuck")
    assert done["type"] == "done"
    resumed_at = time.monotonic()
    time.sleep(1.5)
    assert notify_socket.pings_between(resumed_at, resumed_at + 1.5), "pings resume"
