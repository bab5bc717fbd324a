"""The broker's acknowledgements, matched to who waits: SUBACK/UNSUBACK waiters, PUBACK callbacks.

Packet ids come from paho; this module only keeps the books, so it needs no paho itself. The
network thread notes each acknowledgement; any thread may wait for one or register a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

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
