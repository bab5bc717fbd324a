"""What kioskd remembers about questions it received: held acknowledgements and recent ids.

docs/protocol.md, "Crash safety" and "Duplicate ids": a question's PUBACK waits until its terminal
message has been delivered, so the broker sends it again after a crash, a freeze or a partition.
Such a redelivery (DUP) of a question that is still in hand or has just ended must not start a
second answer, and a client's retry of a finished id gets its terminal message again. Both
memories are bounded in count and time, whatever the load.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")

# A released packet id is remembered this long: a PUBACK lost in a partition makes the broker
# send the question again within one reconnect.
_RELEASED_MID_S = 600.0


def digest(data: bytes) -> bytes:
    """A short fingerprint of a payload or question, to tell a repeat from a new message."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class Finished:
    """A request that has ended: enough to send its terminal message again."""

    question_digest: bytes
    terminal_payload: bytes
    ended_monotonic: float


class PacketLedger:
    """Packet ids of one connection (ids are per session): held and lately released PUBACKs.

    Thread-safe: the network thread asks and holds, the worker's end of a stream releases.
    """

    def __init__(self, *, max_ids: int) -> None:
        self._max_ids = max_ids
        self._lock = threading.Lock()
        # Packet id -> payload digest of questions whose PUBACK is held back.
        self._held: dict[int, bytes] = {}
        # Packet id -> (payload digest, when) of questions acknowledged lately.
        self._released: OrderedDict[int, tuple[bytes, float]] = OrderedDict()

    def hold(self, mid: int, payload: bytes) -> None:
        with self._lock:
            self._held[mid] = digest(payload)

    def release(self, mid: int) -> None:
        """The question's PUBACK is going out now."""
        with self._lock:
            payload_digest = self._held.pop(mid, None)
            if payload_digest is None:
                return
            self._released[mid] = (payload_digest, time.monotonic())
            self._released.move_to_end(mid)
            _trim(self._released, lambda entry: entry[1], _RELEASED_MID_S, self._max_ids)

    def redelivery(self, mid: int, payload: bytes) -> Literal["held", "released"] | None:
        """Whether a DUP message is one we hold, or one acknowledged lately (its PUBACK was
        lost on the way). A broker reuses a packet id once it is acknowledged, so the payload
        must match too."""
        payload_digest = digest(payload)
        with self._lock:
            if self._held.get(mid) == payload_digest:
                return "held"
            released = self._released.get(mid)
            if released is not None and released[0] == payload_digest:
                return "released"
            return None

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)


class RecentAnswers:
    """Request ids that ended lately, with their done; one per kiosk (ids are one namespace
    for P/ask and F/ask alike)."""

    def __init__(self, *, dedup_s: float, max_ids: int) -> None:
        self._dedup_s = dedup_s
        self._max_ids = max_ids
        self._lock = threading.Lock()
        self._finished: OrderedDict[str, Finished] = OrderedDict()

    def set_dedup_s(self, dedup_s: float) -> None:
        with self._lock:
            self._dedup_s = dedup_s

    def finished(self, request_id: str, question: str, terminal_payload: bytes) -> None:
        with self._lock:
            self._finished[request_id] = Finished(
                digest(question.encode("utf-8")), terminal_payload, time.monotonic()
            )
            self._finished.move_to_end(request_id)
            self._expire()

    def recent(self, request_id: str) -> Finished | None:
        """The request of this id that ended within `dedup_s`, if any."""
        with self._lock:
            self._expire()
            return self._finished.get(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._finished.pop(request_id, None)

    def _expire(self) -> None:
        _trim(self._finished, lambda entry: entry.ended_monotonic, self._dedup_s, self._max_ids)


def _trim(
    entries: OrderedDict[_K, _V], when: Callable[[_V], float], max_age_s: float, max_ids: int
) -> None:
    """Drop the oldest entries: beyond the count, and past their age (oldest first)."""
    while len(entries) > max_ids:
        entries.popitem(last=False)
    now = time.monotonic()
    while entries:
        oldest = next(iter(entries.values()))
        if now - when(oldest) <= max_age_s:
            break
        entries.popitem(last=False)
