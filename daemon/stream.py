"""One request's reply stream: its topic, gap-free seq numbers and a single terminal message."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from daemon.broker import JSON, Connection, Delivery
from daemon.messages import Chunk, Error, ErrorCode, StreamMessage

log = logging.getLogger(__name__)


class Outlet(Protocol):
    """Where a stream's messages go: the broker connection, or a recorder in unit tests."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        correlation_data: bytes | None,
        on_delivered: Callable[[], None] | None,
    ) -> Delivery: ...

    def packet_bytes(self, topic: str, payload_bytes: int, correlation_data: bytes | None) -> int:
        """The whole PUBLISH packet's size for a payload of this many bytes."""
        ...

    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker takes now; None when it has not said."""
        ...


class ConnectionOutlet:
    """A broker connection as an Outlet: QoS 1 JSON messages."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def publish(
        self,
        topic: str,
        payload: bytes,
        correlation_data: bytes | None,
        on_delivered: Callable[[], None] | None,
    ) -> Delivery:
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


class ReplyStream:
    """Numbers and publishes a request's messages; refuses anything after the terminal one.

    Several threads may speak for one request (the worker streams chunks, the network thread
    cancels a queued request, shutdown ends it), so seq assignment and the hand-over to the
    publisher happen under one lock: the broker sees seq in order.
    """

    def __init__(
        self,
        outlet: Outlet,
        topic: str,
        request_id: str | None,
        correlation_data: bytes | None = None,
        *,
        streaming: bool = True,
        restart: bool = False,
        on_end: Callable[[StreamMessage, bytes], None] | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        """`on_end` gets the terminal message and its payload as it is sent; `on_delivered`
        runs once the broker has it (or at once when it could not be sent at all)."""
        self._outlet = outlet
        self.topic = topic
        self.request_id = request_id
        self._correlation_data = correlation_data
        self._streaming = streaming
        self._restart = restart
        self._on_end = on_end
        self._on_delivered = on_delivered
        self._lock = threading.RLock()
        self._seq = 0
        self._ended = False

    def send(self, message: StreamMessage) -> bool:
        """Publish `message`; False (and nothing sent) when the stream has already ended.

        A message bigger than the broker accepts would make it drop the connection, so a chunk
        is split into smaller chunks, and a terminal message that cannot fit becomes an error.
        """
        with self._lock:
            if self._ended:
                log.debug("dropping %s for %s: stream already ended", message.type, self.request_id)
                return False
            if isinstance(message, Chunk) and not self._streaming:
                return True  # stream: false; the text comes in the terminal message
            payload = self._payload(message)
            if not self._fits(payload, self._correlation_data):
                if isinstance(message, Chunk) and len(message.text) > 1:
                    half = len(message.text) // 2
                    # Halves of a str never split a character; the lock is re-entrant.
                    return self.send(Chunk(message.text[:half])) and self.send(
                        Chunk(message.text[half:])
                    )
                log.error(
                    "%s for %s is %d bytes, over the broker's limit of %s",
                    message.type,
                    self.request_id,
                    len(payload),
                    self._outlet.max_packet_bytes(),
                )
                if not message.terminal:
                    return True  # a one-character chunk that cannot fit: its text is in done
                message = Error(
                    ErrorCode.INTERNAL,
                    "the answer is larger than the broker's maximum message size; its text "
                    "came in the chunks (raise message_size_limit or lower max_tokens)",
                )
                payload = self._payload(message)
                if not self._fits(payload, self._correlation_data):
                    log.error(
                        "dropping the correlation data of %s: even an error would not fit",
                        self.request_id,
                    )
                    self._correlation_data = None
            self._seq += 1
            self._ended = message.terminal
            on_delivered = self._on_delivered if message.terminal else None
            delivery = self._outlet.publish(
                self.topic, payload, self._correlation_data, on_delivered
            )
            if message.terminal:
                if self._on_end is not None:
                    self._on_end(message, payload)
                if delivery.refused and on_delivered is not None:
                    # It will never be acknowledged; holding its question would only bring it
                    # back after every reconnect.
                    on_delivered()
            return True

    def _payload(self, message: StreamMessage) -> bytes:
        return message.to_payload(
            self.request_id, self._seq, restart=self._restart and not self._seq
        )

    def _fits(self, payload: bytes, correlation_data: bytes | None) -> bool:
        limit = self._outlet.max_packet_bytes()
        if limit is None:
            return True
        return self._outlet.packet_bytes(self.topic, len(payload), correlation_data) <= limit


class ChunkBuffer:
    """Turns token texts into `chunk` messages: each at once, or gathered for slow links.

    With flush_ms 0 every token's text goes out as it comes. Otherwise the answer's first text
    still goes out at once (a reader sees the kiosk start answering without waiting flush_ms;
    it costs one message), and later text is gathered until flush_ms has passed since the first
    unsent piece (checked as tokens arrive) or max_chars are waiting; `flush()` sends the rest
    before the terminal message, so the chunks still add up to done.text.
    """

    def __init__(self, stream: ReplyStream, *, flush_ms: float, max_chars: int | None) -> None:
        self._stream = stream
        self._flush_s = flush_ms / 1000
        self._max_chars = max_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self._first_pending = 0.0
        self._sent_any = False

    def add(self, text: str) -> None:
        if not self._pending:
            self._first_pending = time.monotonic()
        self._pending.append(text)
        self._pending_chars += len(text)
        if (
            not self._sent_any
            or self._flush_s == 0
            or time.monotonic() - self._first_pending >= self._flush_s
            or (self._max_chars is not None and self._pending_chars >= self._max_chars)
        ):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_chars = 0
        self._sent_any = True
        step = self._max_chars or len(text)
        for start in range(0, len(text), step):
            self._stream.send(Chunk(text[start : start + step]))
