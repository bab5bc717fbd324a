"""One request's reply stream: its topic, gap-free seq numbers and a single terminal message."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon.broker import Delivery
from daemon.messages import Chunk, Error, ErrorCode, StreamMessage

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bytes | None], Delivery]

# Bytes of an MQTT PUBLISH besides topic, payload and correlation data: fixed header, lengths,
# packet id and property headers, with room to spare.
_PACKET_OVERHEAD_BYTES = 64


class ReplyStream:
    """Numbers and publishes a request's messages; refuses anything after the terminal one.

    Several threads may speak for one request (the worker streams chunks, the network thread
    cancels a queued request, shutdown ends it), so seq assignment and the hand-over to the
    publisher happen under one lock: the broker sees seq in order.
    """

    def __init__(
        self,
        publish: Publish,
        topic: str,
        request_id: str | None,
        correlation_data: bytes | None = None,
        max_packet_bytes: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._publish = publish
        self._max_packet_bytes = max_packet_bytes
        self.topic = topic
        self.request_id = request_id
        self._correlation_data = correlation_data
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
            limit = self._payload_limit()
            payload = message.to_payload(self.request_id, self._seq)
            if limit is not None and len(payload) > limit:
                if isinstance(message, Chunk) and len(message.text) > 1:
                    half = len(message.text) // 2
                    # Halves of a str never split a character; the lock is re-entrant.
                    return self.send(Chunk(message.text[:half])) and self.send(
                        Chunk(message.text[half:])
                    )
                log.error(
                    "%s for %s is %d bytes, over the broker's limit of %d",
                    message.type,
                    self.request_id,
                    len(payload),
                    limit,
                )
                if message.terminal:
                    message = Error(
                        ErrorCode.INTERNAL,
                        "the answer is larger than the broker's maximum message size; its text "
                        "came in the chunks (raise message_size_limit or lower max_tokens)",
                    )
                    payload = message.to_payload(self.request_id, self._seq)
            self._seq += 1
            self._ended = message.terminal
            self._publish(self.topic, payload, self._correlation_data)
            return True

    def _payload_limit(self) -> int | None:
        packet_limit = self._max_packet_bytes()
        if packet_limit is None:
            return None
        used = len(self.topic.encode("utf-8")) + len(self._correlation_data or b"")
        return packet_limit - used - _PACKET_OVERHEAD_BYTES


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
