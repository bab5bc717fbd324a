"""docs/protocol.md end to end: real mosquitto, real daemon, real embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.support.daemon import Broker, DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed


def test_streamed_answer_chunks_concatenate_to_done_text(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/q1"))
    client.publish(
        daemon.topic("ask"),
        {"id": "q1", "question": "Name three colours.", "max_tokens": 24, "temperature": 0},
    )
    messages = client.stream(daemon.topic("answer/q1"))
    done = assert_well_formed(messages, "q1")
    assert done["type"] == "done"
    assert done["finish_reason"] in ("stop", "length")
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert len(chunks) >= 2, "the answer must stream, not arrive in one piece"
    assert done["usage"]["completion_tokens"] <= 24
    assert done["usage"]["prompt_tokens"] > 0
    timing = done["timing"]
    assert 0 <= timing["queued_ms"] <= timing["first_token_ms"] <= timing["total_ms"]
    assert not any(m["type"] == "queued" for m in messages), "an idle kiosk starts at once"


def test_plain_text_question_gets_generated_id(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), "  What is two plus two?  \n")
    received = client.wait_for(
        lambda got: any(r.json().get("type") in ("done", "error") for r in got)
    )
    request_id = received[0].json()["id"]
    assert len(request_id) == 12
    assert all(c in "0123456789abcdef" for c in request_id)
    assert received[0].topic == daemon.topic(f"answer/{request_id}")
    messages = client.stream(daemon.topic(f"answer/{request_id}"))
    assert assert_well_formed(messages, request_id)["type"] == "done"


def test_json_that_is_not_an_object_is_a_plain_question(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 8}})
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), '["not", "an", "object"]')
    received = client.wait_for(
        lambda got: any(r.json().get("type") in ("done", "error") for r in got)
    )
    assert received[-1].json()["type"] == "done"
    assert received[-1].json()["usage"]["completion_tokens"] <= 8


def test_response_topic_and_correlation_data(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    reply_topic = daemon.topic("answer/terminal-7/inbox")
    client.subscribe(reply_topic)
    client.subscribe(daemon.topic("answer/r1"))
    client.publish(
        daemon.topic("ask"),
        {"id": "r1", "question": "Say hello.", "max_tokens": 12},
        response_topic=reply_topic,
        correlation_data=b"\x00corr-42\xff",
    )
    messages = client.stream(reply_topic)
    assert assert_well_formed(messages, "r1")["type"] == "done"
    delivered = client.on_topic(reply_topic)
    assert len(delivered) == len(messages)
    assert all(r.correlation_data == b"\x00corr-42\xff" for r in delivered)
    assert client.on_topic(daemon.topic("answer/r1")) == [], "nothing on the default topic"


def test_forbidden_response_topic(start_daemon: DaemonFactory, client: TestClient) -> None:
    daemon = start_daemon()
    client.subscribe("#")
    for index, topic in enumerate(["elsewhere/inbox", "$SYS/x", f"{daemon.prefix}/answer/+"]):
        request_id = f"f{index}"
        client.publish(
            daemon.topic("ask"),
            {"id": request_id, "question": "hi"},
            response_topic=topic,
            correlation_data=b"c",
        )
        messages = client.stream(daemon.topic(f"answer/{request_id}"))
        error = assert_well_formed(messages, request_id)
        assert error["code"] == "forbidden_reply_topic"
        assert daemon.prefix + "/answer/" in error["message"], "says which topics are allowed"
    assert not any(r.topic == "elsewhere/inbox" for r in client.received)


def test_mqtt_311_option(start_daemon: DaemonFactory, client: TestClient) -> None:
    daemon = start_daemon({"mqtt": {"protocol": "3.1.1"}})
    client.subscribe(daemon.topic("answer/old"))
    client.publish(daemon.topic("ask"), {"id": "old", "question": "Hello?", "max_tokens": 6})
    assert assert_well_formed(client.stream(daemon.topic("answer/old")), "old")["type"] == "done"


def test_status_retained_online(start_daemon: DaemonFactory, client: TestClient) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("status"))
    received = client.wait_for(bool)
    assert received[0].payload == b"online"
    assert received[0].retain, "a late subscriber must see the status"


def test_unicode_chunks_are_whole_characters(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/jp"))
    client.publish(
        daemon.topic("ask"),
        {
            "id": "jp",
            "question": "東京について日本語で教えてください。",
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    messages = client.stream(daemon.topic("answer/jp"))
    done = assert_well_formed(messages, "jp")
    # Byte-level tokens of CJK text would show up as U+FFFD if a character were split.
    assert any(ord(c) > 0x2FFF for c in done["text"]), "expected Japanese output to test on"
    for chunk in (m for m in messages if m["type"] == "chunk"):
        assert "\ufffd" not in chunk["text"]


def test_queue_overflow_gives_busy(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"queue": {"capacity": 1}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), {"id": "run", "question": "Count.", "max_tokens": 60})
    client.wait_for(lambda got: any(r.json()["type"] == "chunk" for r in got))
    client.publish(daemon.topic("ask"), {"id": "wait", "question": "Count.", "max_tokens": 2})
    client.publish(daemon.topic("ask"), {"id": "full", "question": "Count.", "max_tokens": 2})
    busy = client.stream(daemon.topic("answer/full"), timeout_s=10)
    error = assert_well_formed(busy, "full")
    assert error["code"] == "busy"
    assert error["retry_after_s"] > 0
    assert "request full refused: busy" in daemon.log(), "the journal says what happened"
    waiting = client.stream(daemon.topic("answer/wait"))
    assert waiting[0] == {"id": "wait", "seq": 0, "type": "queued", "position": 1}
    assert assert_well_formed(waiting, "wait")["type"] == "done"
    assert assert_well_formed(client.stream(daemon.topic("answer/run")), "run")["type"] == "done"


def test_queued_position_counts_up(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"queue": {"capacity": 3}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), {"id": "a", "question": "x", "max_tokens": 20})
    for request_id in ("b", "c", "d"):
        # Published back to back, while "a" may not have produced a token yet: "a" counts as
        # running from its arrival, so "b" is next.
        client.publish(daemon.topic("ask"), {"id": request_id, "question": "x", "max_tokens": 1})
    for position, request_id in enumerate(("b", "c", "d"), start=1):
        messages = client.stream(daemon.topic(f"answer/{request_id}"))
        assert messages[0]["type"] == "queued"
        assert messages[0]["position"] == position
        assert assert_well_formed(messages, request_id)["type"] == "done"


def test_cancel_running_request(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon(env=slow_tokens)
    client.subscribe(daemon.topic("answer/long"))
    client.publish(
        daemon.topic("ask"), {"id": "long", "question": "Tell a story.", "max_tokens": 200}
    )
    client.wait_for(lambda got: sum(r.json()["type"] == "chunk" for r in got) >= 3, timeout_s=30)
    client.publish(daemon.topic("cancel"), {"id": "long"})
    messages = client.stream(daemon.topic("answer/long"), timeout_s=10)
    done = assert_well_formed(messages, "long")
    assert done["finish_reason"] == "cancelled"
    assert done["text"], "the text so far comes with the cancellation"
    assert done["usage"]["completion_tokens"] < 200


def test_cancel_queued_request(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon(env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), {"id": "first", "question": "x", "max_tokens": 80})
    client.publish(daemon.topic("ask"), {"id": "second", "question": "x", "max_tokens": 80})
    client.wait_for(lambda got: any(r.topic.endswith("/second") for r in got))
    client.publish(daemon.topic("cancel"), {"id": "second"})
    messages = client.stream(daemon.topic("answer/second"), timeout_s=10)
    assert [m["type"] for m in messages] == ["queued", "done"]
    done = messages[-1]
    assert done["finish_reason"] == "cancelled"
    assert done["text"] == ""
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    # The running one is unaffected, and an unknown id is ignored without harm.
    client.publish(daemon.topic("cancel"), {"id": "no-such-request"})
    first = assert_well_formed(client.stream(daemon.topic("answer/first")), "first")
    assert first["finish_reason"] == "length"
    assert daemon.process.poll() is None


def test_deadline_expires_while_queued(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon(env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), {"id": "slow", "question": "x", "max_tokens": 100})
    client.wait_for(lambda got: any(r.json()["type"] == "chunk" for r in got))
    sent = time.monotonic()
    client.publish(daemon.topic("ask"), {"id": "hurry", "question": "x", "deadline_s": 0.5})
    messages = client.stream(daemon.topic("answer/hurry"), timeout_s=10)
    waited_s = time.monotonic() - sent
    done = assert_well_formed(messages, "hurry")
    assert done["finish_reason"] == "deadline"
    assert done["usage"]["completion_tokens"] == 0
    assert waited_s < 2.5, "the deadline is enforced while the other answer still runs"
    slow = client.stream(daemon.topic("answer/slow"))
    assert slow[-1]["finish_reason"] == "length", "the running request was not harmed"


def test_kioskd_ask_prints_the_streamed_answer(start_daemon: DaemonFactory, broker: Broker) -> None:
    daemon = start_daemon()
    port = broker.port
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "ask",
            "Say hi.",
            "--port",
            str(port),
            "--prefix",
            daemon.prefix,
            "--max-tokens",
            "10",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["type"] == "done"
    assert "".join(m["text"] for m in lines if m["type"] == "chunk") == lines[-1]["text"]
