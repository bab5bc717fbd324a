"""Log lines about other clients' bad or refused messages, at most a few per interval.

A flood of cancels for unknown ids or of refused questions must not fill the journal (and cost
the kiosk its CPU): past the budget, lines of one kind are counted, and the next line of that
kind that gets through says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class LogLimiter:
    """Per kind of line: at most `max_lines` every `interval_s`."""

    def __init__(self, logger: logging.Logger, *, max_lines: int = 10, interval_s: float = 10.0):
        self._logger = logger
        self._max_lines = max_lines
        self._interval_s = interval_s
        self._lock = threading.Lock()
        # kind -> (window start, lines logged in it, lines suppressed since the last one logged)
        self._windows: dict[str, tuple[float, int, int]] = {}

    def log(self, level: int, kind: str, message: str, *args: Any, **kwargs: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            start, logged, suppressed = self._windows.get(kind, (now, 0, 0))
            if now - start >= self._interval_s:
                start, logged = now, 0
            if logged >= self._max_lines:
                self._windows[kind] = (start, logged, suppressed + 1)
                return
            self._windows[kind] = (start, logged + 1, 0)
        if suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, message, *args, **kwargs)
