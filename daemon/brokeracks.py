"""What a connection asked of the broker and what the broker acknowledged: the subscriptions
renewed at every connect, SUBACK/UNSUBACK waiters, PUBACK callbacks, and each publish's handle.

Packet ids come from paho; this module only keeps the books, so it needs no paho itself. The
network thread notes each acknowledgement; any thread may wait for one or register a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

# SUBACK/UNSUBACK ids kept for waiters; only the last few requests are ever waited for.
_MAX_REMEMBERED_ACKS = 256


class Acknowledgements:
    """Acknowledged SUBSCRIBE/UNSUBSCRIBE requests, and callbacks for QoS 1 publishes."""

    def __init__(self) -> None:
        # Ids of SUBSCRIBE/UNSUBSCRIBE requests the broker has acknowledged, for waiters.
        self._acks_cond = threading.Condition()
        self._acked_requests: set[int] = set()
        # Callbacks for QoS 1 publishes, by packet id, run when the broker's PUBACK arrives. A
        # PUBACK may beat the registration (the network thread is quick on loopback): such ids
        # wait in _acked_early until their publish() registers.
        self._delivery_lock = threading.Lock()
        self._on_delivered: dict[int, Callable[[], None] | None] = {}
        self._acked_early: set[int] = set()

    def wait_acknowledged(self, mid: int, timeout_s: float) -> bool:
        """Wait for the SUBACK or UNSUBACK of the request `mid`."""
        with self._acks_cond:
            done = self._acks_cond.wait_for(lambda: mid in self._acked_requests, timeout_s)
            self._acked_requests.discard(mid)
            return done

    def note_acknowledged(self, mid: int) -> None:
        """The broker acknowledged the SUBSCRIBE or UNSUBSCRIBE `mid` (network thread)."""
        with self._acks_cond:
            self._acked_requests.add(mid)
            if len(self._acked_requests) > _MAX_REMEMBERED_ACKS:
                self._acked_requests.pop()  # nobody waits for so old a request
            self._acks_cond.notify_all()

    def register_delivery(self, mid: int, on_delivered: Callable[[], None] | None) -> None:
        """Run `on_delivered` once the QoS 1 publish `mid` is acknowledged (now, if it was)."""
        with self._delivery_lock:
            if mid in self._acked_early:
                self._acked_early.discard(mid)
                delivered_now = True
            else:
                self._on_delivered[mid] = on_delivered
                delivered_now = False
        if delivered_now and on_delivered is not None:
            on_delivered()

    def note_delivered(self, mid: int) -> None:
        """The broker's PUBACK for `mid` arrived (network thread)."""
        with self._delivery_lock:
            if mid in self._on_delivered:
                on_delivered = self._on_delivered.pop(mid)
            else:
                on_delivered = None
                self._acked_early.add(mid)
        # A refused message is delivered all the same: the broker will not take it later.
        if on_delivered is not None:
            on_delivered()


class Subscriptions:
    """The topics subscribed again after every connect, and the SUBACKs still awaited."""

    def __init__(self, topics: Iterable[str]) -> None:
        self._topics = list(topics)
        self._lock = threading.Lock()
        self._pending: dict[int, list[str]] = {}

    @property
    def topics(self) -> list[str]:
        return self._topics

    def add(self, topic: str) -> bool:
        """Keep `topic` for every connect; False if it is kept already."""
        with self._lock:
            if topic in self._topics:
                return False
            # A new list, never changed in place: the network thread may be iterating the old.
            self._topics = [*self._topics, topic]
            return True

    def remove(self, topic: str) -> bool:
        with self._lock:
            if topic not in self._topics:
                return False
            self._topics = [t for t in self._topics if t != topic]
            return True

    def sent(self, mid: int | None, topics: list[str]) -> None:
        """A SUBSCRIBE for `topics` went out as `mid` (None: paho sent nothing)."""
        if mid is not None:
            self._pending[mid] = topics

    def acknowledged(self, mid: int) -> list[str]:
        """The topics of the SUBSCRIBE `mid`, which the broker has now answered."""
        return self._pending.pop(mid, [])

    @property
    def all_acknowledged(self) -> bool:
        return not self._pending


class PublishInfo(Protocol):
    """What a Delivery uses of paho's MQTTMessageInfo."""

    def wait_for_publish(self, timeout: float | None = None) -> None: ...

    def is_published(self) -> bool: ...


class Delivery:
    """Handle on a queued publish: lets shutdown wait until the broker has acknowledged it."""

    def __init__(self, info: PublishInfo | None) -> None:
        self._info = info

    @property
    def refused(self) -> bool:
        """True when the message was never handed to paho (too large, or an error)."""
        return self._info is None

    def wait(self, timeout_s: float) -> bool:
        if self._info is None:
            return False
        try:
            self._info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):  # paho raises when the client is disconnected
            return False
        return self._info.is_published()
