"""The PUBLISH size arithmetic of daemon/packets.py, against paho's own property encoder: the
broker drops a connection over one byte too many, so the two must agree to the byte."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.packets import JSON, publish_packet_bytes, varint_bytes


def _paho_size(
    topic: str, payload_bytes: int, qos: int, correlation: bytes | None, content_type: str | None
) -> int:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        properties.ContentType = content_type
        properties.PayloadFormatIndicator = 1
    if correlation is not None:
        properties.CorrelationData = correlation
    packed = properties.pack()  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(packed) + payload_bytes
    encoded_length = 1
    while remaining >= 128**encoded_length:
        encoded_length += 1
    return 1 + encoded_length + remaining


@given(
    topic=st.text(min_size=1, max_size=300),
    payload_bytes=st.sampled_from([0, 1, 100, 127, 128, 16_000, 16_383, 16_384, 2_097_152]),
    qos=st.sampled_from([0, 1]),
    correlation=st.none() | st.binary(max_size=300),
    content_type=st.none() | st.just(JSON) | st.text(max_size=200),
)
def test_the_size_is_what_paho_encodes(
    topic: str, payload_bytes: int, qos: int, correlation: bytes | None, content_type: str | None
) -> None:
    ours = publish_packet_bytes(
        topic, payload_bytes, qos=qos, correlation_data=correlation, content_type=content_type
    )
    assert ours == _paho_size(topic, payload_bytes, qos, correlation, content_type)


def test_mqtt_311_has_no_properties_at_all() -> None:
    # 1 fixed header byte, 1 length byte, 2 + 7 topic bytes, a packet id, 5 payload bytes.
    assert publish_packet_bytes("a/topic", 5, correlation_data=b"x", mqtt5=False) == 18


def test_variable_byte_integer_lengths() -> None:
    edges = {0: 1, 127: 1, 128: 2, 16_383: 2, 16_384: 3, 2_097_151: 3, 2_097_152: 4}
    assert {value: varint_bytes(value) for value in edges} == edges
