"""docs/protocol.md "Fleet": three real daemons on one real mosquitto, sharing F/ask through an
MQTT 5 shared subscription ($share/{group}/F/ask). The token-delay hook makes answers take a
known time.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import REPO, Broker, Daemon, DaemonFactory
from tests.support.mqtt_client import TestClient

# Two or three daemons in every test.
pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parents[1] / "fixtures"
# About 0.2 s an answer: 8 tokens, 25 ms each.
TIMED = {"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "25"}


@dataclass
class Kiosk:
    name: str
    prefix: str
    daemon: Daemon
    sys_root: Path


@dataclass
class Fleet:
    prefix: str
    kiosks: list[Kiosk]
    client: TestClient
    client_port: int

    def ask(self, request_id: str, question: str = "Name a tool.") -> None:
        self.client.publish(f"{self.prefix}/ask", {"id": request_id, "question": question})

    def terminals(self, request_id: str) -> list[dict[str, Any]]:
        topic = f"{self.prefix}/answer/{request_id}"
        return [
            r.json() for r in self.client.on_topic(topic) if r.json()["type"] in ("done", "error")
        ]

    def wait_answered(self, ids: list[str], timeout_s: float = 60) -> None:
        self.client.wait_for(lambda _got: all(self.terminals(i) for i in ids), timeout_s)

    def kiosk_log(self, name: str) -> str:
        return next(k for k in self.kiosks if k.name == name).daemon.log()


def _set_temp(root: Path, temp_c: float) -> None:
    (root / "class" / "thermal" / "thermal_zone0" / "temp").write_text(f"{round(temp_c * 1000)}\n")


@pytest.fixture
def fleet(
    start_daemon: DaemonFactory, broker: Broker, prefix: str, tmp_path: Path
) -> Callable[..., Fleet]:
    def start(count: int = 3, queue_capacity: int = 12, max_tokens: int = 8) -> Fleet:
        fleet_prefix = f"{prefix}/fleet"
        group = f"g{uuid.uuid4().hex[:8]}"
        client = TestClient(broker.port)
        client.subscribe(f"{fleet_prefix}/#")
        kiosks = []
        for index in range(count):
            name = f"k{index}"
            own = f"{prefix}/{name}"
            root = tmp_path / f"sys-{name}"
            shutil.copytree(FIXTURES / "sys" / "pi5", root, dirs_exist_ok=True)
            _set_temp(root, 50)
            client.subscribe(f"{own}/status")
            daemon = start_daemon(
                {
                    "mqtt": {
                        "topic_prefix": own,
                        "device_id": name,
                        "client_id": f"kioskd-{group}-{name}",
                    },
                    "fleet": {"prefix": fleet_prefix, "group": group},
                    "queue": {"capacity": queue_capacity},
                    "model": {"max_tokens": max_tokens},
                    "telemetry": {"interval_s": 0.5, "sys_root": str(root), "vcgencmd": None},
                    "thermal": {"soft_limit_c": 75, "hard_limit_c": 82, "resume_below_c": 70},
                },
                env=TIMED,
                wait_online=False,
                name=name,
            )
            kiosks.append(Kiosk(name, own, daemon, root))
        for kiosk in kiosks:
            client.wait_status(f"{kiosk.prefix}/status", b"online", timeout_s=90)
        return Fleet(fleet_prefix, kiosks, client, broker.port)

    return start


def _kioskd(*args: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--port", str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _devices(fleet: Fleet, ids: list[str]) -> Counter[str]:
    return Counter(fleet.terminals(i)[0]["device"] for i in ids)


def test_thirty_questions_are_shared_and_each_answered_once(fleet: Callable[..., Fleet]) -> None:
    pool = fleet()
    try:
        ids = [f"q{i}" for i in range(30)]
        for request_id in ids:
            pool.ask(request_id)
        pool.wait_answered(ids)
        time.sleep(1.0)  # a second answer would have come by now
        for request_id in ids:
            terminals = pool.terminals(request_id)
            assert len(terminals) == 1, request_id
            assert terminals[0]["type"] == "done"
        taken = _devices(pool, ids)
        assert set(taken) == {"k0", "k1", "k2"}
        assert min(taken.values()) >= 5, taken

        status = _kioskd("status", "--fleet", pool.prefix, port=pool.client_port)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert sorted(line.split()[0] for line in lines) == ["k0", "k1", "k2"]
        assert all("online" in line and "in the share" in line for line in lines)
        asked = _kioskd("ask", "Name a tool.", "--fleet", pool.prefix, port=pool.client_port)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip(), "the fleet answered the CLI"
    finally:
        pool.client.close()


def test_an_overheated_kiosk_leaves_and_rejoins_when_cool(fleet: Callable[..., Fleet]) -> None:
    pool = fleet()
    try:
        hot = pool.kiosks[0]
        _set_temp(hot.sys_root, 90)
        deadline = time.monotonic() + 20
        while "left the fleet" not in hot.daemon.log():
            assert time.monotonic() < deadline, hot.daemon.log()
            time.sleep(0.1)
        during = [f"h{i}" for i in range(12)]
        for request_id in during:
            pool.ask(request_id)
        pool.wait_answered(during)
        taken = _devices(pool, during)
        assert "k0" not in taken, f"the hot kiosk took {taken['k0']}"
        assert all(pool.terminals(i)[0]["type"] == "done" for i in during)

        _set_temp(hot.sys_root, 50)
        while hot.daemon.log().count("joined the fleet") < 2:
            assert time.monotonic() < deadline + 20, hot.daemon.log()
            time.sleep(0.1)
        after = [f"c{i}" for i in range(12)]
        for request_id in after:
            pool.ask(request_id)
        pool.wait_answered(after)
        assert _devices(pool, after)["k0"] >= 2, "it takes questions again"
    finally:
        pool.client.close()


def test_a_clean_stop_loses_nothing_asked_after_it(fleet: Callable[..., Fleet]) -> None:
    pool = fleet()
    try:
        stopped = pool.kiosks[1]
        stopped.daemon.process.send_signal(signal.SIGTERM)
        assert stopped.daemon.process.wait(30) == 0
        assert "left the fleet" in stopped.daemon.log()
        ids = [f"s{i}" for i in range(12)]
        for request_id in ids:
            pool.ask(request_id)
        pool.wait_answered(ids)
        for request_id in ids:
            terminals = pool.terminals(request_id)
            assert [t["type"] for t in terminals] == ["done"], request_id
        assert "k1" not in _devices(pool, ids)
    finally:
        pool.client.close()


def test_sigkill_with_client_retries_ends_every_question_with_one_done(
    fleet: Callable[..., Fleet],
) -> None:
    pool = fleet()
    try:
        ids = [f"r{i}" for i in range(15)]
        for request_id in ids:
            pool.ask(request_id)
        pool.kiosks[2].daemon.process.send_signal(signal.SIGKILL)
        # A fleet client's timeout: well past the longest queue (5 answers of ~0.3 s here).
        for _attempt in range(4):
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and not all(pool.terminals(i) for i in ids):
                time.sleep(0.1)
            missing = [i for i in ids if not pool.terminals(i)]
            if not missing:
                break
            for request_id in missing:
                pool.ask(request_id)  # the same id and question again
        time.sleep(1.0)
        for request_id in ids:
            terminals = pool.terminals(request_id)
            assert [t["type"] for t in terminals] == ["done"], (request_id, terminals)
    finally:
        pool.client.close()


def test_a_duplicate_id_is_refused_by_the_kiosk_that_has_it(fleet: Callable[..., Fleet]) -> None:
    pool = fleet(max_tokens=200)  # about 5 s: long enough to find the kiosk that runs it
    try:
        client = pool.client
        client.publish(f"{pool.prefix}/ask", {"id": "twin", "question": "Tell a story."})
        client.wait_for(lambda got: any(r.topic.endswith("/answer/twin") for r in got))
        for kiosk in pool.kiosks:
            kiosk.daemon.process.send_signal(signal.SIGUSR1)  # logs "running <id>"
        deadline = time.monotonic() + 10
        while not any("running twin" in k.daemon.log() for k in pool.kiosks):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        owner = next(k for k in pool.kiosks if "running twin" in k.daemon.log())
        client.subscribe(f"{owner.prefix}/error")
        client.publish(f"{owner.prefix}/ask", {"id": "twin", "question": "Again?"})
        refused = client.wait_for(
            lambda got: any(r.topic == f"{owner.prefix}/error" for r in got), timeout_s=10
        )
        error = next(r.json() for r in refused if r.topic == f"{owner.prefix}/error")
        assert error["code"] == "duplicate_id"
        assert error["device"] == owner.name
        client.publish(f"{pool.prefix}/cancel", "twin")
        pool.wait_answered(["twin"])
        done = pool.terminals("twin")
        assert [(t["type"], t["device"]) for t in done] == [("done", owner.name)]
        assert done[0]["finish_reason"] == "cancelled", "F/cancel reaches the kiosk that has it"
    finally:
        pool.client.close()


def test_a_conversation_lives_on_the_kiosk_that_answered_it_and_f_forget_drops_it(
    fleet: Callable[..., Fleet],
) -> None:
    pool = fleet(count=2)
    try:
        client = pool.client
        client.publish(
            f"{pool.prefix}/ask",
            {"id": "turn-1", "question": "Name a tool.", "conversation_id": "fleet-conv-9"},
        )
        pool.wait_answered(["turn-1"])
        first = pool.terminals("turn-1")[0]
        assert first["conversation"]["new"]
        owner = next(k for k in pool.kiosks if k.name == first["device"])
        # docs/protocol.md: follow-ups go to the kiosk's own P/ask.
        client.subscribe(f"{owner.prefix}/answer/+")

        def follow_up(request_id: str) -> dict[str, Any]:
            client.publish(
                f"{owner.prefix}/ask",
                {"id": request_id, "question": "And?", "conversation_id": "fleet-conv-9"},
            )
            return client.stream(f"{owner.prefix}/answer/{request_id}")[-1]

        second = follow_up("turn-2")
        assert (second["conversation"]["turn"], second["conversation"]["new"]) == (2, False)
        client.publish(f"{pool.prefix}/forget", {"conversation_id": "fleet-conv-9"})
        deadline = time.monotonic() + 10
        while "fleet forget for conversation fleet-conv-9" not in owner.daemon.log():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        third = follow_up("turn-3")
        assert (third["conversation"]["turn"], third["conversation"]["new"]) == (1, True)
    finally:
        pool.client.close()
