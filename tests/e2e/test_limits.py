"""What kioskd sends stays within the broker's limits, and senders are rate limited."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.brokeracks import Delivery
from daemon.messages import Chunk, Done, Timing, Usage
from daemon.packets import JSON, publish_packet_bytes
from daemon.ratelimit import RateLimiter
from daemon.stream import ChunkBuffer, ReplyStream
from tests.support.daemon import Broker, DaemonFactory, free_port
from tests.support.mqtt_client import TestClient, assert_well_formed


class Recorder:
    """Stands in for the broker connection: keeps what the stream publishes, and its sizes."""

    def __init__(self, max_packet_bytes: int | None = None) -> None:
        self.sent: list[dict[str, object]] = []
        self.sizes: list[int] = []
        self._max_packet_bytes = max_packet_bytes

    def publish(
        self,
        topic: str,
        payload: bytes,
        correlation_data: bytes | None,
        on_delivered: Callable[[], None] | None,
    ) -> Delivery:
        self.sent.append(json.loads(payload))
        self.sizes.append(self.packet_bytes(topic, len(payload), correlation_data))
        return Delivery(None)

    def packet_bytes(self, topic: str, payload_bytes: int, correlation_data: bytes | None) -> int:
        return publish_packet_bytes(
            topic, payload_bytes, correlation_data=correlation_data, content_type=JSON
        )

    def max_packet_bytes(self) -> int | None:
        return self._max_packet_bytes


def test_oversized_chunks_are_split_without_breaking_characters() -> None:
    recorder = Recorder(max_packet_bytes=200)
    stream = ReplyStream(recorder, "k/answer/a", "a", b"corr")
    text = "Grüße aus der Fabrik, 工場からこんにちは! " * 4
    stream.send(Chunk(text))
    assert len(recorder.sent) > 1
    assert "".join(str(m["text"]) for m in recorder.sent) == text
    assert [m["seq"] for m in recorder.sent] == list(range(len(recorder.sent)))
    assert max(recorder.sizes) <= 200


def test_done_too_big_leaves_out_its_text_and_ends_the_stream() -> None:
    recorder = Recorder(max_packet_bytes=400)
    stream = ReplyStream(recorder, "k/answer/b", "b")
    done = Done("x" * 1000, "length", Usage(10, 300), Timing(0, 1, 2, 3))
    assert stream.send(done)
    assert recorder.sent[-1]["type"] == "done"
    assert recorder.sent[-1]["text_omitted"] is True
    assert "usage" in recorder.sent[-1], "only as much is left out as must be"
    assert not stream.send(Chunk("late")), "nothing after the terminal message"
    assert max(recorder.sizes) <= 400


def test_no_limit_sends_as_is() -> None:
    recorder = Recorder()
    ReplyStream(recorder, "k/answer/c", "c").send(Chunk("y" * 100_000))
    assert len(recorder.sent) == 1


def test_rate_limiter_per_sender() -> None:
    limiter = RateLimiter(2.0)
    assert limiter.allow("a", now=0.0) is None
    assert limiter.allow("a", now=0.0) is None
    wait_s = limiter.allow("a", now=0.0)
    assert wait_s == pytest.approx(0.5)
    assert limiter.allow("b", now=0.0) is None, "senders are independent"
    assert limiter.allow("a", now=0.5) is None, "tokens refill at the rate"


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(1.0)
    for index in range(5000):
        limiter.allow(f"sender-{index}", now=0.0)
    assert len(limiter._buckets) <= 1024


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(free_port(), tmp_path, extra_config="max_packet_size 1024\n")
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_answers_stay_within_the_broker_packet_limit(
    start_daemon: DaemonFactory, small_broker: Broker, protocol: str
) -> None:
    # MQTT 5 learns the limit from CONNACK; 3.1.1 needs mqtt.max_message_bytes.
    mqtt = {"protocol": protocol}
    if protocol == "3.1.1":
        mqtt["max_message_bytes"] = 1024  # type: ignore[assignment]
    daemon = start_daemon(
        {"mqtt": mqtt, "model": {"max_tokens": 400}},
        env={"KIOSKD_TEST_IGNORE_EOS": "1"},
        port=small_broker.port,
    )
    client = TestClient(small_broker.port)
    try:
        client.subscribe(daemon.topic("answer/+"))
        client.publish(
            daemon.topic("ask"),
            {"id": "big", "question": "Tell a long story.", "max_tokens": 400, "temperature": 0},
        )
        messages = client.stream(daemon.topic("answer/big"), timeout_s=120)
        final = assert_well_formed(messages, "big")
        assert final["type"] == "done"
        assert final["text_omitted"] is True, "the whole answer would not fit in one message"
        text = "".join(m["text"] for m in messages if m["type"] == "chunk")
        assert final["usage"]["completion_tokens"] == 400
        assert len(text.encode("utf-8")) > 1024, "the chunks carried all of it"
        assert all(len(r.payload) <= 1024 for r in client.received)
        client.publish(daemon.topic("ask"), {"id": "small", "question": "Hi", "max_tokens": 4})
        small = assert_well_formed(client.stream(daemon.topic("answer/small")), "small")
        assert small["type"] == "done"
        assert "lost the broker" not in daemon.log(), "no oversized publish reached the broker"
    finally:
        client.close()


def test_rate_limit_per_sender_over_mqtt(start_daemon: DaemonFactory, client: TestClient) -> None:
    daemon = start_daemon({"limits": {"max_requests_per_s": 0.5}, "model": {"max_tokens": 2}})
    client.subscribe(daemon.topic("answer/+"))
    for request_id in ("a1", "a2"):
        client.publish(
            daemon.topic("ask"),
            {"id": request_id, "question": "hi"},
            user_properties=[("client_id", "terminal-a")],
        )
    client.publish(
        daemon.topic("ask"),
        {"id": "b1", "question": "hi"},
        user_properties=[("client_id", "terminal-b")],
    )
    limited = assert_well_formed(client.stream(daemon.topic("answer/a2")), "a2")
    assert limited["code"] == "busy"
    assert 0 < limited["retry_after_s"] <= 2
    assert assert_well_formed(client.stream(daemon.topic("answer/a1")), "a1")["type"] == "done"
    assert assert_well_formed(client.stream(daemon.topic("answer/b1")), "b1")["type"] == "done"


def test_chunk_buffer_gathers_for_flush_ms_and_caps_length() -> None:
    recorder = Recorder()
    buffer = ChunkBuffer(ReplyStream(recorder, "k/answer/d", "d"), flush_ms=10_000, max_chars=5)
    for piece in ("ab", "c", "defgh", "i"):
        buffer.add(piece)
    buffer.flush()
    texts = [str(m["text"]) for m in recorder.sent]
    assert "".join(texts) == "abcdefghi"
    assert all(len(text) <= 5 for text in texts)
    assert texts[0] == "ab", "the answer's first text goes out at once"
    assert texts[1] == "cdefg", "later text waits until 5 characters are waiting"
    immediate = Recorder()
    at_once = ChunkBuffer(ReplyStream(immediate, "k/answer/e", "e"), flush_ms=0, max_chars=None)
    at_once.add("x")
    assert len(immediate.sent) == 1, "flush_ms 0 sends each piece as it comes"


def test_flush_ms_over_mqtt_sends_fewer_chunks(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(
        {"stream": {"flush_ms": 200, "max_chunk_chars": 40}},
        env={"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "20"},
    )
    client.subscribe(daemon.topic("answer/few"))
    client.publish(daemon.topic("ask"), {"id": "few", "question": "x", "max_tokens": 60})
    messages = client.stream(daemon.topic("answer/few"))
    done = assert_well_formed(messages, "few")
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert len(chunks) < done["usage"]["completion_tokens"] / 3
    assert all(len(m["text"]) <= 40 for m in chunks)
