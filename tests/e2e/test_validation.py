"""Malformed requests over MQTT: each gets the protocol's error where the client can see it, and
the daemon answers the next question (the parser's own cases are in tests/unit/test_validation.py).
"""

from __future__ import annotations

from tests.support.daemon import DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed
from tests.unit.test_validation import LIMITS, MALFORMED


def _error_topic(prefix: str, request_id: str | None) -> str:
    return f"{prefix}/answer/{request_id}" if request_id else f"{prefix}/error"


def test_malformed_burst_over_mqtt_then_a_valid_question(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"limits": LIMITS})
    client.subscribe(daemon.topic("error"))
    client.subscribe(daemon.topic("answer/+"))
    for _name, payload, _code, _request_id in MALFORMED:
        client.publish(daemon.topic("ask"), payload)
    expected_on_error = sum(1 for m in MALFORMED if m[3] is None)
    client.wait_for(
        lambda got: (
            sum(r.topic == daemon.topic("error") for r in got) >= expected_on_error
            and all(
                any(r.topic == _error_topic(daemon.prefix, m[3]) for r in got) for m in MALFORMED
            )
        )
    )
    on_error = [r.json() for r in client.on_topic(daemon.topic("error"))]
    assert sorted(m["code"] for m in on_error) == sorted(
        str(m[2]) for m in MALFORMED if m[3] is None
    )
    for message in on_error:
        assert message["type"] == "error"
        assert message["seq"] == 0
        assert message["id"] is None
    for name, _payload, code, request_id in MALFORMED:
        if request_id is None:
            continue
        messages = client.stream(daemon.topic(f"answer/{request_id}"))
        error = assert_well_formed(messages, request_id)
        assert error["code"] == str(code), name
    # Nothing above harmed the daemon: the next question is answered.
    client.publish(daemon.topic("ask"), {"id": "after", "question": "Hello.", "max_tokens": 5})
    after = assert_well_formed(client.stream(daemon.topic("answer/after")), "after")
    assert after["type"] == "done"
    assert daemon.process.poll() is None


def test_invalid_request_with_response_topic_goes_there(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    inbox = daemon.topic("answer/inbox-1")
    client.subscribe(inbox)
    client.publish(
        daemon.topic("ask"), b'{"question": ""}', response_topic=inbox, correlation_data=b"k"
    )
    messages = client.stream(inbox)
    error = assert_well_formed(messages, messages[0]["id"])
    assert error["code"] == "invalid_request"
    assert "question" in error["message"]
    assert client.on_topic(inbox)[0].correlation_data == b"k"
