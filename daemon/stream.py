"""One request's reply stream: its topic, gap-free seq numbers and a single terminal message."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from daemon.broker import Delivery
from daemon.messages import StreamMessage

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bytes | None], Delivery]


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
    ) -> None:
        self._publish = publish
        self.topic = topic
        self.request_id = request_id
        self._correlation_data = correlation_data
        self._lock = threading.Lock()
        self._seq = 0
        self._ended = False
        self.last_delivery: Delivery | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    def send(self, message: StreamMessage) -> bool:
        """Publish `message`; False (and nothing sent) when the stream has already ended."""
        with self._lock:
            if self._ended:
                log.debug("dropping %s for %s: stream already ended", message.type, self.request_id)
                return False
            payload = message.to_payload(self.request_id, self._seq)
            self._seq += 1
            self._ended = message.terminal
            self.last_delivery = self._publish(self.topic, payload, self._correlation_data)
            return True
