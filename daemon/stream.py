"""One request's reply stream: its topic, gap-free seq numbers and a single terminal message."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon.messages import Chunk, Done, Error, ErrorCode, StreamMessage
from daemon.outlet import Outlet

log = logging.getLogger(__name__)


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
        max_message_bytes: int | None = None,
        device: str | None = None,
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
        # The requester's own limit (max_message_bytes), on top of the broker's.
        self._max_message_bytes = max_message_bytes
        self._device = device
        self._lock = threading.RLock()
        self._seq = 0
        self._ended = False

    def send(self, message: StreamMessage) -> bool:
        """Publish `message`; False (and nothing sent) when the stream has already ended.

        Nothing bigger than the limit is sent (the broker would drop the connection, a tiny
        client would drop the message): a chunk is split into smaller chunks, a `done` leaves
        out its text, then its timing, then its usage, and an error's message is cut short.
        """
        with self._lock:
            if self._ended:
                log.debug("dropping %s for %s: stream already ended", message.type, self.request_id)
                return False
            if isinstance(message, Chunk) and not self._streaming:
                return True  # stream: false; the text comes in the terminal message
            payload = self._payload(message)
            if not self._fits(payload):
                if isinstance(message, Chunk):
                    return self._send_split(message, payload)
                message = self._fitted(message, payload)
                payload = self._payload(message)
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

    def _send_split(self, chunk: Chunk, payload: bytes) -> bool:
        if len(chunk.text) > 1:
            half = len(chunk.text) // 2
            # Halves of a str never split a character; the lock is re-entrant.
            return self.send(Chunk(chunk.text[:half])) and self.send(Chunk(chunk.text[half:]))
        log.error(
            "a one-character chunk for %s is %d bytes, over the limit of %s; its text is in done",
            self.request_id,
            len(payload),
            self._limit(),
        )
        return True

    def _fitted(self, message: StreamMessage, payload: bytes) -> StreamMessage:
        """A terminal message, or a queued one, cut down to the limit (called with the lock)."""
        if isinstance(message, Done):
            candidates = message.smaller()
            fitting = next((m for m in candidates if self._fits(self._payload(m))), None)
            if fitting is not None and "text" in fitting.omitted and not self._streaming:
                # stream: false and a small limit: the text comes as chunks after all.
                self._streaming = True
                if message.text:
                    self.send(Chunk(message.text))
                # Later seq numbers can be longer: check again.
                fitting = next((m for m in candidates if self._fits(self._payload(m))), None)
            if fitting is not None:
                return fitting
        elif isinstance(message, Error):
            over = self._packet_bytes(payload) - (self._limit() or 0)
            shortened = message.shortened(over)
            if shortened.message != "..." and self._fits(self._payload(shortened)):
                return shortened
        log.error(
            "%s for %s is %d bytes, over the limit of %s",
            message.type,
            self.request_id,
            len(payload),
            self._limit(),
        )
        if not message.terminal:
            return message  # a queued message that cannot fit: nothing smaller to say
        fallback: StreamMessage = Error(ErrorCode.INTERNAL, "the answer does not fit the limit")
        if not self._fits(self._payload(fallback)):
            log.error(
                "dropping the correlation data of %s: even an error would not fit",
                self.request_id,
            )
            self._correlation_data = None
        return fallback

    def _payload(self, message: StreamMessage) -> bytes:
        return message.to_payload(
            self.request_id,
            self._seq,
            restart=self._restart and not self._seq,
            device=self._device,
        )

    def _limit(self) -> int | None:
        known = [
            limit for limit in (self._outlet.max_packet_bytes(), self._max_message_bytes) if limit
        ]
        return min(known) if known else None

    def _packet_bytes(self, payload: bytes) -> int:
        return self._outlet.packet_bytes(self.topic, len(payload), self._correlation_data)

    def _fits(self, payload: bytes) -> bool:
        limit = self._limit()
        return limit is None or self._packet_bytes(payload) <= limit


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
