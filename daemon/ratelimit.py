"""Per-sender token buckets for `limits.max_requests_per_s`, bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict

# Senders remembered at once; the least recently seen is forgotten first. A flood of made-up
# sender names can therefore cost at most this many small entries.
_MAX_SENDERS = 1024


class RateLimiter:
    """Allows `rate_per_s` requests per second per sender, with bursts of up to one second's."""

    def __init__(self, rate_per_s: float) -> None:
        self._rate_per_s = rate_per_s
        self._burst = max(1.0, rate_per_s)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, sender: str, now: float | None = None) -> float | None:
        """None if `sender` may ask now; else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(sender, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate_per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[sender] = (tokens, now)
        if len(self._buckets) > _MAX_SENDERS:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self._rate_per_s
