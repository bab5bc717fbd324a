"""MQTT packets as kioskd sees them, without paho: a received PUBLISH (`Inbound`), the last will,
and the exact size of an outgoing PUBLISH with its properties, as a broker's Maximum Packet Size
counts it (MQTT 5.0, sections 2.2.2 and 3.3). broker.py builds the same properties for paho."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

JSON = "application/json"

# MQTT 5 property identifiers, each one byte, before its value (section 2.2.2.2).
_PROPERTY_ID_BYTES = 1
_PAYLOAD_FORMAT_INDICATOR_BYTES = _PROPERTY_ID_BYTES + 1
_LENGTH_PREFIX_BYTES = 2  # UTF-8 strings and binary data carry a two-byte length


@dataclass(frozen=True)
class Inbound:
    """A received PUBLISH, reduced to what kioskd reads."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    retain: bool = False
    qos: int = 0
    # The broker's packet id: with the QoS 1 acknowledgement held back (manual_ack), a message
    # the broker sends again (dup) after a reconnect comes with the same one.
    mid: int = 0
    dup: bool = False


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


class PacketLimit:
    """The largest PUBLISH a connection may send: the configured limit, or the broker's if it is
    smaller (MQTT 5 brokers announce theirs in the CONNACK)."""

    def __init__(self, configured_bytes: int | None, *, mqtt5: bool) -> None:
        self.configured_bytes = configured_bytes
        self.broker_bytes: int | None = None
        self.mqtt5 = mqtt5

    @property
    def max_bytes(self) -> int | None:
        known = [limit for limit in (self.configured_bytes, self.broker_bytes) if limit]
        return min(known) if known else None

    def refuses(
        self,
        topic: str,
        payload_bytes: int,
        *,
        qos: int,
        correlation_data: bytes | None,
        content_type: str | None,
    ) -> bool:
        """Whether the packet is over the limit; the refusal is logged."""
        limit = self.max_bytes
        if limit is None:
            return False
        size = publish_packet_bytes(
            topic,
            payload_bytes,
            qos=qos,
            correlation_data=correlation_data,
            content_type=content_type,
            mqtt5=self.mqtt5,
        )
        if size <= limit:
            return False
        log.error(
            "not publishing %d bytes to %s: over the broker's maximum packet size of %d",
            size,
            topic,
            limit,
        )
        return True


def publish_packet_bytes(
    topic: str,
    payload_bytes: int,
    *,
    qos: int = 1,
    correlation_data: bytes | None = None,
    content_type: str | None = None,
    mqtt5: bool = True,
) -> int:
    """The size of the whole PUBLISH packet, as a broker's maximum packet size counts it."""
    variable = _LENGTH_PREFIX_BYTES + len(topic.encode("utf-8")) + (2 if qos > 0 else 0)
    if mqtt5:
        properties = publish_properties_bytes(correlation_data, content_type)
        variable += varint_bytes(properties) + properties
    remaining = variable + payload_bytes
    return 1 + varint_bytes(remaining) + remaining


def publish_properties_bytes(correlation_data: bytes | None, content_type: str | None) -> int:
    """The PUBLISH properties kioskd sends, without their own length prefix."""
    size = 0
    if content_type is not None:
        # broker.py marks every content type it sends as UTF-8 text (Payload Format Indicator).
        size += _PROPERTY_ID_BYTES + _LENGTH_PREFIX_BYTES + len(content_type.encode("utf-8"))
        size += _PAYLOAD_FORMAT_INDICATOR_BYTES
    if correlation_data is not None:
        size += _PROPERTY_ID_BYTES + _LENGTH_PREFIX_BYTES + len(correlation_data)
    return size


def varint_bytes(value: int) -> int:
    """The length of MQTT's variable byte integer encoding of `value`."""
    size = 1
    while value >= 128:
        value >>= 7
        size += 1
    return size
