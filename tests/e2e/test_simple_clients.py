"""docs/protocol.md "Simple clients", as MQTT.js, Node-RED and mosquitto_pub users found them.

Real mosquitto, real daemon, real embedded model.
"""

from __future__ import annotations

import time

from tests.support.daemon import DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed


def test_refused_response_topic_of_an_id_less_question_goes_to_the_error_topic(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("#"))
    client.subscribe("client/#")
    # mosquitto_pub -V mqttv5 -t P/ask -D publish response-topic client/browser-1/reply ...
    client.publish(
        daemon.topic("ask"), "hi", response_topic="client/browser-1/reply", correlation_data=b"c1"
    )
    client.publish(
        daemon.topic("ask"),
        {"question": "hi"},
        response_topic="client/browser-1/reply",
        correlation_data=b"c2",
    )
    errors = client.wait_for(
        lambda got: len([r for r in got if r.topic == daemon.topic("error")]) >= 2
    )
    on_error_topic = [r for r in errors if r.topic == daemon.topic("error")]
    assert sorted(r.correlation_data or b"" for r in on_error_topic) == [b"c1", b"c2"]
    for received in on_error_topic:
        error = received.json()
        assert error["type"] == "error"
        assert error["code"] == "forbidden_reply_topic"
        assert error["id"] is None, "a generated id means nothing to the sender"
        assert daemon.prefix + "/answer/" in error["message"]
    time.sleep(0.5)
    assert not any(r.topic.startswith(daemon.topic("answer/")) for r in client.received)
    assert not any(r.topic.startswith("client/") for r in client.received)


def test_wildcard_response_topic_is_refused_for_its_wildcard(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/w1"))
    client.publish(
        daemon.topic("ask"),
        {"id": "w1", "question": "hi"},
        response_topic=daemon.topic("answer/+"),
        correlation_data=b"c",
    )
    error = assert_well_formed(client.stream(daemon.topic("answer/w1")), "w1")
    assert error["code"] == "forbidden_reply_topic"
    assert "wildcard" in error["message"]


def test_duplicate_id_is_refused_apart_from_the_running_stream(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 40}}, env=slow_tokens)
    client.subscribe(daemon.topic("#"))
    client.publish(daemon.topic("ask"), {"id": "d1", "question": "Tell a story."})
    client.wait_for(
        lambda got: any(r.topic == daemon.topic("answer/d1") for r in got), timeout_s=30
    )
    client.publish(daemon.topic("ask"), {"id": "d1", "question": "Another one."})
    reply_topic = daemon.topic("answer/node-red-7")
    client.publish(
        daemon.topic("ask"),
        {"id": "d1", "question": "A third."},
        response_topic=reply_topic,
        correlation_data=b"nr",
    )
    original = assert_well_formed(client.stream(daemon.topic("answer/d1")), "d1")
    assert original["type"] == "done", "the first asker's answer goes on to its end"
    assert original["finish_reason"] == "length"

    on_error = [r for r in client.received if r.topic == daemon.topic("error")]
    assert len(on_error) == 1
    refusal = on_error[0].json()
    assert refusal["code"] == "duplicate_id"
    assert refusal["id"] == "d1"
    assert refusal["type"] == "error"
    assert "seq" not in refusal, "never shaped like a message of the running stream"
    assert refusal["message"]
    to_sender = [r for r in client.received if r.topic == reply_topic]
    assert len(to_sender) == 1
    assert to_sender[0].json()["code"] == "duplicate_id"
    assert to_sender[0].correlation_data == b"nr"
    assert daemon.log().count("duplicate_id") >= 2, "each refusal is logged"


def test_cancel_takes_a_plain_text_id(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 400}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/p1"))
    client.publish(daemon.topic("ask"), {"id": "p1", "question": "Tell a story."})
    client.wait_for(lambda got: any(r.json()["type"] == "chunk" for r in got), timeout_s=30)
    client.publish(daemon.topic("cancel"), "p1\n")
    done = assert_well_formed(client.stream(daemon.topic("answer/p1")), "p1")
    assert done["finish_reason"] == "cancelled"


def test_stream_false_sends_only_the_terminal_message(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 12}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.publish(daemon.topic("ask"), {"id": "s1", "question": "Hello?", "stream": False})
    client.publish(daemon.topic("ask"), {"id": "s2", "question": "Hello?", "stream": False})
    first = client.stream(daemon.topic("answer/s1"))
    assert [m["type"] for m in first] == ["done"]
    assert first[0]["seq"] == 0
    assert first[0]["text"], "the whole answer is in the one message"
    assert first[0]["usage"]["completion_tokens"] == 12
    waited = client.stream(daemon.topic("answer/s2"))
    assert [(m["seq"], m["type"]) for m in waited] == [(0, "queued"), (1, "done")], (
        "seq still follows on without gaps"
    )


def test_stream_must_be_a_boolean(start_daemon: DaemonFactory, client: TestClient) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/b1"))
    client.publish(daemon.topic("ask"), {"id": "b1", "question": "hi", "stream": "no"})
    error = assert_well_formed(client.stream(daemon.topic("answer/b1")), "b1")
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("stream:")


def test_mqtt5_replies_carry_content_type_and_payload_format(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 6}})
    client.subscribe(daemon.topic("answer/ct"))
    client.subscribe(daemon.topic("error"))
    client.subscribe(daemon.topic("health"))
    client.publish(daemon.topic("ask"), {"id": "ct", "question": "hi"})
    client.publish(daemon.topic("ask"), b"\xff\xfe not utf-8")
    client.stream(daemon.topic("answer/ct"))
    client.wait_for(lambda got: any(r.topic == daemon.topic("error") for r in got))
    client.wait_for(lambda got: any(r.topic == daemon.topic("health") for r in got))
    replies = [r for r in client.received if r.topic != daemon.topic("health")]
    assert len(replies) >= 3
    for received in client.received:
        assert received.content_type == "application/json", received
        assert received.payload_format == 1, received


def test_health_follows_busy_and_ready_between_intervals(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    # An answer far shorter than the interval: only a health message at each change shows it.
    daemon = start_daemon({"telemetry": {"interval_s": 300}, "model": {"max_tokens": 6}})
    client.subscribe(daemon.topic("health"))
    client.wait_for(lambda got: any(r.json()["state"] == "ready" for r in got))
    client.subscribe(daemon.topic("answer/hb"))
    client.publish(daemon.topic("ask"), {"id": "hb", "question": "hi"})
    client.stream(daemon.topic("answer/hb"))
    states = client.wait_for(
        lambda got: (
            [r.json()["state"] for r in got if r.topic.endswith("/health")][-1:] == ["ready"]
            and any(r.topic.endswith("/health") and r.json()["state"] == "busy" for r in got)
        )
    )
    health = [r.json() for r in states if r.topic.endswith("/health")]
    busy_at = next(i for i, h in enumerate(health) if h["state"] == "busy")
    assert any(h["state"] == "ready" for h in health[busy_at:]), "ready again after the answer"
    assert health[-1]["counters"]["answered"] == 1
