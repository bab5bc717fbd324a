"""Nothing lost, nothing twice (docs/protocol.md "Crash safety", "Duplicate ids"): crashes, freezes,
partitions and packet limits, against a real mosquitto, the real daemon and the embedded model.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Broker, DaemonFactory, free_port
from tests.support.mqtt_client import Received, TestClient, assert_well_formed
from tests.support.tcp_proxy import TcpProxy


def _own_session() -> dict[str, Any]:
    """A client id of this test's own, so no other test's persistent session is inherited."""
    return {"mqtt": {"client_id": f"kioskd-{uuid.uuid4().hex[:10]}"}}


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        for section, keys in part.items():
            merged.setdefault(section, {}).update(keys)
    return merged


def _messages(received: list[Received], topic: str) -> list[dict[str, Any]]:
    return [r.json() for r in received if r.topic == topic]


def _terminals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] in ("done", "error")]


def _last_run(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream as a client renders it: from the last `restart`, duplicates (QoS 1 resends
    of one seq) dropped."""
    starts = [i for i, m in enumerate(messages) if m.get("restart")]
    run = messages[starts[-1] :] if starts else messages
    seen: dict[int, dict[str, Any]] = {}
    for message in run:
        seen.setdefault(message["seq"], message)
    return [seen[seq] for seq in sorted(seen)]


def test_sigkill_with_running_and_queued_questions_ends_each_once_after_restart(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    config = _merge(_own_session(), {"model": {"max_tokens": 30}})
    daemon = start_daemon(config, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    ids = ["k1", "k2", "k3"]
    for request_id in ids:
        client.publish(daemon.topic("ask"), {"id": request_id, "question": "Tell a story."})
    client.wait_for(
        lambda got: (
            any(r.json()["type"] == "chunk" for r in got if r.topic.endswith("/k1"))
            and all(any(r.topic.endswith(f"/{i}") for r in got) for i in ("k2", "k3"))
        ),
        timeout_s=30,
    )
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    assert not any(
        _terminals(_messages(client.received, daemon.topic(f"answer/{i}"))) for i in ids
    ), "the kill came before any answer ended"

    start_daemon(config, env=slow_tokens, name="restarted")
    client.wait_for(
        lambda got: all(_terminals(_messages(got, daemon.topic(f"answer/{i}"))) for i in ids),
        timeout_s=60,
    )
    time.sleep(1.0)  # anything sent twice would have come by now
    for request_id in ids:
        messages = _messages(client.received, daemon.topic(f"answer/{request_id}"))
        assert len({str(t) for t in _terminals(messages)}) == 1, f"{request_id}: one terminal"
        restarted = [m for m in messages if m.get("restart")]
        assert len(restarted) == 1, f"{request_id}: the repeated stream is marked once"
        assert restarted[0]["seq"] == 0
        final = assert_well_formed(_last_run(messages), request_id)
        assert final["type"] == "done"
        assert final["finish_reason"] == "length"


@pytest.mark.slow
def test_freeze_past_keepalive_answers_once(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    config = _merge(
        _own_session(),
        {"mqtt": {"keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 2}},
    )
    daemon = start_daemon(
        config, env={"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "60"}
    )
    topic = daemon.topic("answer/fz")
    client.subscribe(topic)
    client.subscribe(daemon.topic("status"))
    client.publish(daemon.topic("ask"), {"id": "fz", "question": "Tell a story.", "max_tokens": 60})
    client.wait_for(lambda got: any(r.topic == topic for r in got), timeout_s=30)
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        client.wait_status(daemon.topic("status"), b"offline", timeout_s=20)  # 1.5 keepalives
        time.sleep(12 - 7.5)
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    client.wait_for(lambda got: bool(_terminals(_messages(got, topic))), timeout_s=60)
    time.sleep(2.0)  # a second answer would be under way by now
    messages = _messages(client.received, topic)
    assert len(_terminals(messages)) == 1, "exactly one done"
    assert not any(m.get("restart") for m in messages), "the stream went on, it did not restart"
    final = assert_well_formed(_last_run(messages), "fz")
    assert final["usage"]["completion_tokens"] == 60
    assert "again; it is in hand" in daemon.log(), "the broker's redelivery was seen and skipped"


@pytest.mark.slow
def test_partition_between_delivery_and_answer_answers_once(
    start_daemon: DaemonFactory, broker: Broker, client: TestClient
) -> None:
    proxy = TcpProxy(broker.port)
    try:
        config = _merge(
            _own_session(),
            {"mqtt": {"keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 2}},
        )
        daemon = start_daemon(
            config,
            env={"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "60"},
            port=proxy.port,
        )
        topic = daemon.topic("answer/pt")
        client.subscribe(topic)
        client.subscribe(daemon.topic("status"))
        client.publish(
            daemon.topic("ask"), {"id": "pt", "question": "Tell a story.", "max_tokens": 60}
        )
        client.wait_for(lambda got: any(r.topic == topic for r in got), timeout_s=30)
        proxy.blackhole()
        client.wait_status(daemon.topic("status"), b"offline", timeout_s=20)
        proxy.heal()
        client.wait_for(lambda got: bool(_terminals(_messages(got, topic))), timeout_s=60)
        time.sleep(2.0)
        messages = _messages(client.received, topic)
        assert len(_terminals(messages)) == 1
        assert not any(m.get("restart") for m in messages)
        final = assert_well_formed(_last_run(messages), "pt")
        assert final["usage"]["completion_tokens"] == 60
    finally:
        proxy.close()


def test_retry_of_a_finished_id_gets_the_same_terminal_message(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 8}})
    topic = daemon.topic("answer/rt")
    client.subscribe(topic)
    client.publish(daemon.topic("ask"), {"id": "rt", "question": "Name a tool."})
    first = assert_well_formed(client.stream(topic), "rt")
    count = len(client.received)
    client.publish(daemon.topic("ask"), {"id": "rt", "question": "Name a tool."})
    again = client.wait_for(lambda got: len(got) > count)[count:]
    assert [r.json() for r in again] == [first], "the same terminal message, no new answer"
    assert daemon.log().count("request rt ended") == 1
    # The same id for another question is a new question.
    client.publish(daemon.topic("ask"), {"id": "rt", "question": "Name a colour."})
    fresh = client.wait_for(
        lambda got: len(_terminals(_messages(got[count + 1 :], topic))) >= 1, timeout_s=30
    )
    assert _terminals(_messages(fresh[count + 1 :], topic))[0]["type"] == "done"
    deadline = time.monotonic() + 10
    while daemon.log().count("request rt ended") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the log line follows the terminal message
    assert daemon.log().count("request rt ended") == 2


@pytest.fixture
def small_packet_broker(tmp_path: Path) -> Iterator[Broker]:
    # docs/security.md recommends a limit like this one.
    instance = Broker(free_port(), tmp_path, extra_config="max_packet_size 4096\n")
    instance.start()
    yield instance
    instance.stop()


def test_replies_that_cannot_fit_never_reach_the_broker(
    start_daemon: DaemonFactory, small_packet_broker: Broker
) -> None:
    daemon = start_daemon(port=small_packet_broker.port)
    client = TestClient(small_packet_broker.port)
    try:
        client.subscribe(daemon.topic("#"))
        # The question fits the broker's limit; no reply with this correlation data could.
        client.publish(
            daemon.topic("ask"),
            {"id": "c1", "question": "hi"},
            correlation_data=b"x" * 3900,
        )
        long_topic = daemon.topic("answer/" + "t" * 3900)
        client.publish(
            daemon.topic("ask"), {"id": "c2", "question": "hi"}, response_topic=long_topic
        )
        client.publish(daemon.topic("ask"), {"question": "hi"}, correlation_data=b"y" * 3900)
        c1 = assert_well_formed(client.stream(daemon.topic("answer/c1")), "c1")
        assert c1["code"] == "too_large"
        assert "4096" in c1["message"]
        c2 = assert_well_formed(client.stream(daemon.topic("answer/c2")), "c2")
        assert c2["code"] == "too_large"
        id_less = client.wait_for(
            lambda got: any(r.topic == daemon.topic("error") for r in got), timeout_s=10
        )
        assert next(r for r in id_less if r.topic == daemon.topic("error")).json()["code"] == (
            "too_large"
        )
        client.publish(daemon.topic("ask"), {"id": "next", "question": "hi", "max_tokens": 4})
        after = assert_well_formed(client.stream(daemon.topic("answer/next")), "next")
        assert after["type"] == "done"
        time.sleep(1.0)
        statuses = [r.payload for r in client.received if r.topic == daemon.topic("status")]
        assert statuses == [b"online"], "the kiosk never lost the broker"
        assert "lost the broker" not in daemon.log()
        assert "without the correlation data" in daemon.log()
        assert all(len(r.payload) < 4096 for r in client.received)
    finally:
        client.close()


def test_sighup_reloads_live_keys_and_refuses_a_broken_file(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"queue": {"capacity": 8}, "model": {"max_tokens": 40}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    original = daemon.config_path.read_text()
    daemon.config_path.write_text(
        original.replace("capacity: 8", "capacity: 0") + "model_typo: 1\n"
    )
    daemon.process.send_signal(signal.SIGHUP)
    _wait_log(daemon.log, "reload refused")
    assert "model_typo" in daemon.log()
    assert daemon.process.poll() is None

    daemon.config_path.write_text(
        original.replace("capacity: 8", "capacity: 0").replace("max_tokens: 40", "max_tokens: 41")
    )
    daemon.process.send_signal(signal.SIGHUP)
    _wait_log(daemon.log, "reload: applied")
    assert "model.max_tokens changed; it takes effect only after a restart" in daemon.log()
    client.publish(daemon.topic("ask"), {"id": "h1", "question": "x"})
    client.wait_for(lambda got: any(r.topic.endswith("/h1") for r in got), timeout_s=30)
    client.publish(daemon.topic("ask"), {"id": "h2", "question": "x"})
    refused = assert_well_formed(client.stream(daemon.topic("answer/h2")), "h2")
    assert refused["code"] == "busy", "queue.capacity 0 is in effect"
    done = assert_well_formed(client.stream(daemon.topic("answer/h1")), "h1")
    assert done["usage"]["completion_tokens"] == 40, "model.max_tokens waits for a restart"


def test_other_signals_are_logged_and_survived(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 4}})
    daemon.process.send_signal(signal.SIGUSR1)
    # A burst: a handler that took a lock the main thread held would deadlock on one of these.
    for _ in range(40):
        daemon.process.send_signal(signal.SIGUSR2)
    daemon.process.send_signal(signal.SIGALRM)
    _wait_log(daemon.log, "SIGALRM")
    log = daemon.log()
    assert "state: ready; running -" in log, "SIGUSR1 logs a one-line state dump"
    assert "received SIGUSR2; ignored" in log
    client.subscribe(daemon.topic("answer/alive"))
    client.publish(daemon.topic("ask"), {"id": "alive", "question": "hi"})
    assert assert_well_formed(client.stream(daemon.topic("answer/alive")), "alive")["type"] == (
        "done"
    )
    assert daemon.terminate() == 0


def _wait_log(read: Any, text: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in read():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in the log:\n{read()}")
        time.sleep(0.1)
