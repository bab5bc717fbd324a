"""A plain MQTT 5 client for the tests: the daemon is exercised as a device would use it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None
    arrived_monotonic: float
    content_type: str | None = None
    payload_format: int | None = None

    def json(self) -> Any:
        return json.loads(self.payload)


class TestClient:
    """Subscribes, publishes with MQTT 5 properties, and waits for what arrives."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, port: int, *, host: str = "127.0.0.1", max_packet_bytes: int | None = None
    ) -> None:
        """`max_packet_bytes` is announced in CONNECT: the broker drops bigger packets to us."""
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self._acked: set[int] = set()
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        properties = None
        if max_packet_bytes is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.MaximumPacketSize = max_packet_bytes
        self._client.connect(host, port, properties=properties)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        item = Received(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            getattr(props, "CorrelationData", None) if props else None,
            time.monotonic(),
            getattr(props, "ContentType", None) if props else None,
            getattr(props, "PayloadFormatIndicator", None) if props else None,
        )
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK, so nothing published after this is missed."""
        _rc, mid = self._client.subscribe(topic, qos)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acked, timeout=10):
                raise TimeoutError(f"no SUBACK for {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        qos: int = 1,
        retain: bool = False,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        properties = None
        if response_topic is not None or correlation_data is not None or user_properties:
            properties = Properties(PacketTypes.PUBLISH)
            if user_properties:
                properties.UserProperty = user_properties
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(10)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 30.0
    ) -> list[Received]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.received), timeout=timeout_s):
                last = [(r.topic, r.payload[:200]) for r in self.received[-8:]]
                raise TimeoutError(
                    f"condition not met within {timeout_s} s; got {len(self.received)} "
                    f"messages, the last ones: {last}"
                )
            return list(self.received)

    def on_topic(self, topic: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.topic == topic]

    def stream(self, topic: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """The messages on `topic` up to and including the first terminal one."""

        def ended(received: list[Received]) -> bool:
            return any(
                r.topic == topic and r.json().get("type") in ("done", "error") for r in received
            )

        self.wait_for(ended, timeout_s)
        messages = [r.json() for r in self.on_topic(topic)]
        end = next(i for i, m in enumerate(messages) if m["type"] in ("done", "error"))
        return messages[: end + 1]

    def wait_status(self, topic: str, value: bytes, timeout_s: float = 60.0) -> None:
        self.wait_for(
            lambda received: (
                bool(received)
                and any(r.topic == topic for r in received)
                and [r for r in received if r.topic == topic][-1].payload == value
            ),
            timeout_s,
        )

    def close(self) -> None:
        close_paho(self._client)


def close_paho(client: paho.Client) -> None:
    """Disconnect, stop the loop, and close every socket the client holds.

    loop_start() opens a loopback TCP socket pair to wake its thread that loop_stop() leaves
    open (only Client.__del__ closes it); collected later by the cycle collector, the sockets
    raise ResourceWarning, which this suite turns into an error at exit.
    """
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()


def assert_well_formed(messages: list[dict[str, Any]], request_id: str | None) -> dict[str, Any]:
    """Check docs/protocol.md's stream rules and return the terminal message."""
    assert messages, "no messages"
    assert [m["seq"] for m in messages] == list(range(len(messages))), "seq must be 0,1,2,..."
    assert all(m["id"] == request_id for m in messages)
    terminal = [m for m in messages if m["type"] in ("done", "error")]
    assert len(terminal) == 1
    assert messages[-1] is terminal[0], "the terminal message must be last"
    final = terminal[0]
    if final["type"] == "done":
        if final.get("text_omitted"):
            # Left out to fit a small packet: the chunks are the whole answer.
            assert "text" not in final
        else:
            chunks = "".join(m["text"] for m in messages if m["type"] == "chunk")
            assert chunks == final["text"], "chunk texts must concatenate to done.text"
        if "usage" in final:
            usage = final["usage"]
            # docs/protocol.md "Prompt reuse": cached_tokens is in every done.
            assert set(usage) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
            assert 0 <= usage["cached_tokens"] <= max(0, usage["prompt_tokens"] - 1)
        if "conversation" in final:
            assert set(final["conversation"]) == {
                "id",
                "turn",
                "context_tokens",
                "dropped_turns",
                "new",
            }
        if "timing" in final:
            assert set(final["timing"]) == {
                "queued_ms",
                "first_token_ms",
                "total_ms",
                "tokens_per_s",
            }
    else:
        assert isinstance(final["code"], str)
        assert final["message"]
    return final
