"""The broker as a request's replies see it: what Intake and ReplyStream use of the connection.

Both go through these protocols, not the broker Connection itself, so that unit tests can drive
them with a recorder; the daemon passes its Connection, which meets IntakeConnection as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from daemon.packets import JSON, Inbound


class Sent(Protocol):
    """A publish handed to the broker connection (brokeracks.Delivery is one)."""

    @property
    def refused(self) -> bool:
        """True when the message will never reach the broker."""
        ...


class IntakeConnection(Protocol):
    """What Intake uses of a broker connection: publish, size, acknowledge."""

    @property
    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker takes now; None when it has not said."""
        ...

    def packet_bytes(
        self,
        topic: str,
        payload_bytes: int,
        *,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> int:
        """The whole PUBLISH packet's size for a payload of this many bytes."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> Sent:
        """Queue a QoS 1 message; `on_delivered` runs once the broker has it."""
        ...

    def acknowledge(self, message: Inbound) -> None:
        """Send the PUBACK of a message received with its acknowledgement held back."""
        ...


class Outlet(Protocol):
    """Where a stream's messages go: the broker connection, or a recorder in unit tests."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        correlation_data: bytes | None,
        on_delivered: Callable[[], None] | None,
    ) -> Sent: ...

    def packet_bytes(self, topic: str, payload_bytes: int, correlation_data: bytes | None) -> int:
        """The whole PUBLISH packet's size for a payload of this many bytes."""
        ...

    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker takes now; None when it has not said."""
        ...


class ConnectionOutlet:
    """A broker connection as an Outlet: QoS 1 JSON messages."""

    def __init__(self, connection: IntakeConnection) -> None:
        self._connection = connection

    def publish(
        self,
        topic: str,
        payload: bytes,
        correlation_data: bytes | None,
        on_delivered: Callable[[], None] | None,
    ) -> Sent:
        return self._connection.publish(
            topic,
            payload,
            correlation_data=correlation_data,
            content_type=JSON,
            on_delivered=on_delivered,
        )

    def packet_bytes(self, topic: str, payload_bytes: int, correlation_data: bytes | None) -> int:
        return self._connection.packet_bytes(
            topic, payload_bytes, correlation_data=correlation_data, content_type=JSON
        )

    def max_packet_bytes(self) -> int | None:
        return self._connection.max_packet_bytes
