"""`kioskd ask` and `kioskd status` as a person and a shell script use them, against the real
broker and daemon: Ctrl-C, a closed pipe, a missing broker, a wrong prefix, an offline kiosk."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from daemon import exitcodes
from tests.support.daemon import REPO, Broker, DaemonFactory, free_port
from tests.support.mqtt_client import TestClient
from tests.support.security_broker import (
    KIOSK_PREFIX,
    TERMINAL_USER,
    SecureBroker,
    daemon_config,
    make_pki,
    write_passwd,
)
from tests.support.terminal import Terminal

KIOSKD = [sys.executable, "-m", "daemon"]


def kioskd(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KIOSKD, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def target(port: int, prefix: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--prefix", prefix]


@pytest.fixture
def watcher(broker: Broker, prefix: str) -> Iterator[TestClient]:
    """Sees, as another client on the broker, every question, cancel and answer of the kiosk."""
    client = TestClient(broker.port)
    for topic in ("ask", "cancel", "answer/+"):
        client.subscribe(f"{prefix}/{topic}")
    yield client
    client.close()


def first_chunk_id(watcher: TestClient, prefix: str) -> str:
    received = watcher.wait_for(
        lambda got: any(r.topic.startswith(f"{prefix}/answer/") for r in got)
    )
    return str(next(r for r in received if r.topic.startswith(f"{prefix}/answer/")).json()["id"])


def wait_cancelled(watcher: TestClient, prefix: str, request_id: str) -> None:
    """The cancel the client sent is on the broker, and the kiosk ended the answer for it."""
    watcher.wait_for(
        lambda got: any(
            r.topic == f"{prefix}/cancel" and r.json() == {"id": request_id} for r in got
        )
    )
    final = watcher.stream(f"{prefix}/answer/{request_id}")[-1]
    assert (final["type"], final.get("finish_reason")) == ("done", "cancelled")


def test_ctrl_c_cancels_the_question_and_exits_130(
    start_daemon: DaemonFactory,
    broker: Broker,
    prefix: str,
    slow_tokens: dict[str, str],
    watcher: TestClient,
) -> None:
    start_daemon({"model": {"max_tokens": 400}}, env=slow_tokens)
    terminal = Terminal([*KIOSKD, "ask", "Tell a long story.", *target(broker.port, prefix)])
    try:
        request_id = first_chunk_id(watcher, prefix)
        terminal.type(b"\x03")
        rc = terminal.wait(10)
    finally:
        terminal.close()
    shown = terminal.output()
    assert rc == exitcodes.INTERRUPTED, shown
    assert "Traceback" not in shown
    assert (
        f"interrupted; asked {prefix} to cancel {request_id} (the broker acknowledged it)" in shown
    )
    wait_cancelled(watcher, prefix, request_id)


@pytest.mark.parametrize("lines", [1, 3])
def test_a_closed_pipe_stops_quietly_and_cancels(
    start_daemon: DaemonFactory,
    broker: Broker,
    prefix: str,
    slow_tokens: dict[str, str],
    watcher: TestClient,
    tmp_path: Path,
    lines: int,
) -> None:
    start_daemon({"model": {"max_tokens": 400}}, env=slow_tokens)
    ask = shlex.join([*KIOSKD, "ask", "Count.", "--json", *target(broker.port, prefix)])
    errors, status = tmp_path / "stderr", tmp_path / "pipestatus"
    script = f'{ask} 2>"$1" | head -{lines}; echo "${{PIPESTATUS[@]}}" >"$2"'
    shell = subprocess.run(
        ["bash", "-c", script, "bash", str(errors), str(status)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = [json.loads(line) for line in shell.stdout.splitlines()]
    assert len(shown) == lines
    assert errors.read_text() == ""  # quiet: no traceback, no "Exception ignored" at exit
    assert status.read_text().split() == [str(exitcodes.OUTPUT_CLOSED), "0"]
    wait_cancelled(watcher, prefix, shown[0]["id"])


def test_no_stream_prints_the_whole_answer_once(
    start_daemon: DaemonFactory, broker: Broker, prefix: str, watcher: TestClient
) -> None:
    start_daemon()
    result = kioskd(
        "ask", "Name a colour.", "--no-stream", "--max-tokens", "8", *target(broker.port, prefix)
    )
    assert result.returncode == exitcodes.OK, result.stderr
    asked = watcher.wait_for(lambda got: any(r.topic == f"{prefix}/ask" for r in got))
    request = next(r for r in asked if r.topic == f"{prefix}/ask").json()
    assert request["stream"] is False
    final = watcher.stream(f"{prefix}/answer/{request['id']}")[-1]
    assert final["type"] == "done"
    assert result.stdout == final["text"] + "\n"


@pytest.mark.parametrize("command", ["ask", "status"])
def test_no_broker_names_the_broker_and_the_cause(command: str) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = kioskd(command, *(["Hi"] if command == "ask" else []), *target(port, "kiosk/x"))
    took_s = time.monotonic() - started
    assert result.returncode == exitcodes.BROKER_UNREACHABLE
    assert took_s < 10
    assert f"cannot reach broker 127.0.0.1:{port}: Connection refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert "health" not in result.stderr


def test_a_broker_that_never_answers_is_given_up_within_10_s() -> None:
    with socket.socket() as silent:  # accepts TCP, never speaks MQTT
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = kioskd("ask", "Hi", *target(port, "kiosk/x"))
        took_s = time.monotonic() - started
    assert result.returncode == exitcodes.BROKER_UNREACHABLE
    assert took_s < 10
    assert f"no MQTT connection to broker 127.0.0.1:{port} within" in result.stderr


def test_a_refused_login_says_so(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    write_passwd(passwords, {"terminal": "right"})
    wrong = tmp_path / "wrong-password"
    wrong.write_text("wrong\n")
    config = tmp_path / "kioskd.yaml"
    port = free_port()
    config.write_text(
        yaml.safe_dump(
            {"mqtt": {"port": port, "username": "terminal", "password_file": str(wrong)}}
        )
    )
    # No change of user (as tests/support/security_broker.py): the file lives in pytest's tmp dir.
    with Broker(port, tmp_path, extra_config=f"password_file {passwords}\nuser root\n"):
        result = kioskd("ask", "Hi", "--config", str(config), "--prefix", "kiosk/x")
    assert result.returncode == exitcodes.BROKER_REFUSED
    assert f"broker 127.0.0.1:{port} refused the connection: Not authorized" in result.stderr
    assert "wrong" not in result.stderr  # the password itself is never shown


def test_ask_and_status_log_in_over_tls_as_the_config_says(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """The operator's way: --config gives broker, user, password file, CA and prefix."""
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "broker").mkdir()
    secure = SecureBroker(tmp_path / "broker", pki)
    secure.start()
    try:
        kiosk_secret, terminal_secret = tmp_path / "kiosk.pass", tmp_path / "terminal.pass"
        kiosk_secret.write_text(secure.kiosk_password + "\n")
        terminal_secret.write_text(secure.terminal_password + "\n")
        start_daemon(
            daemon_config(secure.port, ca=pki.ca, password_file=kiosk_secret),
            port=secure.port,
            wait_online=False,
        )
        config = tmp_path / "terminal.yaml"
        terminal = {
            "host": "127.0.0.1",
            "port": secure.port,
            "username": TERMINAL_USER,
            "password_file": str(terminal_secret),
            "topic_prefix": KIOSK_PREFIX,
            "tls": {"ca_file": str(pki.ca)},
        }
        config.write_text(yaml.safe_dump({"mqtt": terminal}))
        deadline = time.monotonic() + 60
        while (status := kioskd("status", "--config", str(config))).returncode != exitcodes.OK:
            assert status.returncode == exitcodes.NO_KIOSK, status.stderr  # not online yet
            assert time.monotonic() < deadline, status.stderr
        assert f"Kiosk     {KIOSK_PREFIX} " in status.stdout
        asked = kioskd("ask", "Hi", "--json", "--max-tokens", "3", "--config", str(config))
        assert asked.returncode == exitcodes.OK, asked.stderr
        assert json.loads(asked.stdout.splitlines()[-1])["type"] == "done"
        assert secure.terminal_password not in asked.stdout + asked.stderr + status.stderr
    finally:
        secure.stop()


@pytest.mark.parametrize("command", ["ask", "status"])
def test_a_prefix_without_a_kiosk_is_named(broker: Broker, prefix: str, command: str) -> None:
    result = kioskd(command, *(["Hi"] if command == "ask" else []), *target(broker.port, prefix))
    assert result.returncode == exitcodes.NO_KIOSK
    assert f"no kiosk at prefix {prefix} on broker 127.0.0.1:{broker.port}" in result.stderr
    assert result.stdout == ""


def test_status_shows_the_age_and_fails_once_the_kiosk_is_offline(
    start_daemon: DaemonFactory, broker: Broker, prefix: str, client: TestClient
) -> None:
    daemon = start_daemon({"telemetry": {"interval_s": 60}})
    client.subscribe(f"{prefix}/health")
    client.wait_for(bool)
    time.sleep(2)  # an age that a constant "0 s ago" could not match

    before = time.time()
    online = kioskd("status", *target(broker.port, prefix))
    after = time.time()
    assert online.returncode == exitcodes.OK, online.stderr
    shown = re.search(r"^Health +from (\d+) s ago", online.stdout, re.MULTILINE)
    assert shown is not None, online.stdout
    age_s = int(shown[1])
    sent = [r.json()["ts"] for r in client.on_topic(f"{prefix}/health")]
    assert any(before - ts - 1 <= age_s <= after - ts + 1 for ts in sent), (age_s, sent, before)
    raw = kioskd("status", "--json", *target(broker.port, prefix))
    assert json.loads(raw.stdout)["ts"] in sent  # --json stays the message as it was sent

    assert daemon.terminate() == 0
    offline = kioskd("status", *target(broker.port, prefix))
    assert offline.returncode == exitcodes.KIOSK_OFFLINE
    assert f"the kiosk at {prefix} on broker 127.0.0.1:{broker.port} is offline" in offline.stderr
    assert re.search(r"^Health +from \d+ s ago", offline.stdout, re.MULTILINE)
    asked = kioskd("ask", "Hi", *target(broker.port, prefix))
    assert asked.returncode == exitcodes.KIOSK_OFFLINE
    assert "is offline" in asked.stderr
