"""docs/protocol.md "Tiny devices": replies that fit a microcontroller's MQTT buffer.

The test client announces Maximum Packet Size in CONNECT, as an MQTT 5 stack on a
microcontroller would; mosquitto then silently drops every bigger packet to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from daemon.brokeracks import Delivery
from daemon.messages import Chunk, Done, Error, ErrorCode, Timing, Usage
from daemon.packets import JSON, publish_packet_bytes
from daemon.stream import ReplyStream
from tests.support.daemon import REPO, DaemonFactory
from tests.support.mqtt_client import Received, TestClient, assert_well_formed

LONG = {"KIOSKD_TEST_IGNORE_EOS": "1"}


def _packet_bytes(received: Received) -> int:
    """The PUBLISH as mosquitto sent it to the client (QoS 1, with the kiosk's properties)."""
    return publish_packet_bytes(
        received.topic,
        len(received.payload),
        correlation_data=received.correlation_data,
        content_type=received.content_type,
    )


def _ask(
    tiny: TestClient, daemon_topic: Callable[[str], str], request: dict[str, Any]
) -> list[dict[str, Any]]:
    topic = daemon_topic(f"answer/{request['id']}")
    tiny.subscribe(topic)
    tiny.publish(daemon_topic("ask"), request)
    return tiny.stream(topic, timeout_s=60)


def test_a_256_byte_client_gets_every_message_and_the_done(
    start_daemon: DaemonFactory, broker: Any
) -> None:
    daemon = start_daemon(env=LONG)
    tiny = TestClient(broker.port, max_packet_bytes=256)
    try:
        messages = _ask(
            tiny,
            daemon.topic,
            {
                "id": "esp1",
                "question": "Describe the line.",
                "max_tokens": 40,
                "max_message_bytes": 256,
            },
        )
        done = messages[-1]
        assert done["type"] == "done"
        assert done["text_omitted"] is True
        assert "text" not in done
        assert [m["seq"] for m in messages] == list(range(len(messages))), "nothing was dropped"
        text = "".join(m["text"] for m in messages if m["type"] == "chunk")
        assert len(text) > 40, "the chunks carry the answer"
        assert all(_packet_bytes(r) <= 256 for r in tiny.received)
    finally:
        tiny.close()


def test_without_max_message_bytes_the_tiny_client_never_sees_the_done(
    start_daemon: DaemonFactory, broker: Any
) -> None:
    daemon = start_daemon(env=LONG)
    tiny = TestClient(broker.port, max_packet_bytes=256)
    watcher = TestClient(broker.port)
    try:
        topic = daemon.topic("answer/esp2")
        tiny.subscribe(topic)
        watcher.subscribe(topic)
        tiny.publish(
            daemon.topic("ask"), {"id": "esp2", "question": "Describe the line.", "max_tokens": 40}
        )
        done = assert_well_formed(watcher.stream(topic, timeout_s=60), "esp2")
        assert done["type"] == "done"
        assert not any(r.json()["type"] == "done" for r in tiny.on_topic(topic)), (
            "mosquitto dropped the done: the problem is real"
        )
    finally:
        tiny.close()
        watcher.close()


def test_stream_false_with_a_small_limit_still_delivers_the_answer(
    start_daemon: DaemonFactory, broker: Any
) -> None:
    daemon = start_daemon(env=LONG)
    tiny = TestClient(broker.port, max_packet_bytes=256)
    try:
        messages = _ask(
            tiny,
            daemon.topic,
            {
                "id": "esp3",
                "question": "Describe the line.",
                "max_tokens": 40,
                "stream": False,
                "max_message_bytes": 256,
            },
        )
        assert messages[-1]["type"] == "done"
        assert messages[-1]["text_omitted"] is True
        chunks = [m for m in messages if m["type"] == "chunk"]
        assert chunks, "the omitted text came in chunks after all"
        assert [m["seq"] for m in messages] == list(range(len(messages)))
        assert all(_packet_bytes(r) <= 256 for r in tiny.received)
    finally:
        tiny.close()


def test_multibyte_answer_under_192_bytes_splits_no_character(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    # The base model echoes its frame: a Japanese system prompt with emoji makes it answer so.
    system_prompt = "あなたは工場のキオスクです🏭。日本語で丁寧に答えてください🔧👷。"
    # With a Japanese example too: the completion frame's English ones would set the language.
    example = {"question": "機械が止まったらどうしますか。", "answer": "停止ボタンを押して🔧。"}
    daemon = start_daemon(
        {"model": {"system_prompt": system_prompt, "examples": [example]}}, env=LONG
    )
    messages = _ask(
        client,
        daemon.topic,
        {
            "id": "cjk",
            "question": "日本語で答えてください。東京について教えて。",
            "max_tokens": 80,
            "temperature": 0,
            "max_message_bytes": 192,
        },
    )
    assert messages[-1]["type"] == "done"
    received = client.on_topic(daemon.topic("answer/cjk"))
    assert all(_packet_bytes(r) <= 192 for r in received)
    for r in received:
        r.payload.decode("utf-8")  # a split character would not decode
    text = "".join(m["text"] for m in messages if m["type"] == "chunk")
    assert any(ord(c) > 0x2FFF for c in text), "the answer really has multi-byte characters"


def test_unit_chunks_of_emoji_and_cjk_stay_whole_and_within_the_limit() -> None:
    sent: list[bytes] = []

    class Recorder:
        def publish(
            self, topic: str, payload: bytes, correlation: bytes | None, on_delivered: Any
        ) -> Delivery:
            sent.append(payload)
            return Delivery(None)

        def packet_bytes(self, topic: str, payload_bytes: int, correlation: bytes | None) -> int:
            return publish_packet_bytes(
                topic, payload_bytes, correlation_data=correlation, content_type=JSON
            )

        def max_packet_bytes(self) -> int | None:
            return None

    topic = "kiosk/line-3/answer/u1"
    stream = ReplyStream(Recorder(), topic, "u1", max_message_bytes=192)
    text = "工場🏭の安全👷‍♀️" * 40
    stream.send(Chunk(text))
    stream.send(Done(text, "length", Usage(10, 80), Timing(1.0, 2.0, 3.0, 4.0)))
    bodies = [json.loads(p) for p in sent]
    assert "".join(b["text"] for b in bodies if b["type"] == "chunk") == text
    assert bodies[-1]["text_omitted"] is True
    assert all(publish_packet_bytes(topic, len(p), content_type=JSON) <= 192 for p in sent)


def test_done_leaves_out_text_then_timing_then_usage() -> None:
    done = Done("x" * 300, "stop", Usage(1, 2), Timing(1.0, 2.0, 3.0, 4.0))
    shapes = [set(json.loads(d.to_payload("a", 0))) for d in done.smaller()]
    assert shapes == [
        {"id", "seq", "type", "text_omitted", "finish_reason", "usage", "timing"},
        {"id", "seq", "type", "text_omitted", "finish_reason", "usage"},
        {"id", "seq", "type", "text_omitted", "finish_reason"},
    ]
    long_error = Error(ErrorCode.INVALID_REQUEST, "é" * 200)
    short = long_error.shortened(100)
    cut = len(long_error.to_payload("a", 0)) - len(short.to_payload("a", 0))
    assert cut in (100, 101), "cut by whole two-byte characters only"
    assert short.message.endswith("...")


def test_a_limit_out_of_range_is_invalid_request_naming_the_field(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    for index, limit in enumerate([191, 65537, 0, -5, "256", True, 256.5]):
        request_id = f"lim{index}"
        messages = _ask(
            client, daemon.topic, {"id": request_id, "question": "hi", "max_message_bytes": limit}
        )
        error = assert_well_formed(messages, request_id)
        assert error["code"] == "invalid_request", limit
        assert error["message"].startswith("max_message_bytes:")


def test_correlation_data_that_leaves_no_room_is_refused_within_the_limit(
    start_daemon: DaemonFactory, broker: Any
) -> None:
    daemon = start_daemon()
    tiny = TestClient(broker.port, max_packet_bytes=192)
    try:
        topic = daemon.topic("answer/esp4")
        tiny.subscribe(topic)
        tiny.publish(
            daemon.topic("ask"),
            {"id": "esp4", "question": "hi", "max_message_bytes": 192},
            correlation_data=b"c" * 120,
        )
        error = assert_well_formed(tiny.stream(topic, timeout_s=30), "esp4")
        assert error["code"] == "too_large"
        assert error["message"], "cut short to fit, but still says something"
        assert all(_packet_bytes(r) <= 192 for r in tiny.received)
    finally:
        tiny.close()


def test_kioskd_ask_sends_max_message_bytes(start_daemon: DaemonFactory, broker: Any) -> None:
    daemon = start_daemon(env=LONG)
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "daemon", "ask", "Describe the line.", "--json", "--max-tokens", "30"),
            *("--max-message-bytes", "256", "--port", str(broker.port)),
            *("--prefix", daemon.prefix),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    assert messages[-1]["type"] == "done"
    assert messages[-1]["text_omitted"] is True
