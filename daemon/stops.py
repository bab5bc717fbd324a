"""The answer's text as the model writes it, trimmed to what the client is shown.

docs/protocol.md, "Stop strings and JSON answers": leading white space is not part of an answer, and
the answer ends just before the first stop string it would contain. Text is published as soon
as it cannot become part of a stop string any more; only a tail that could still grow into one
is held back, so no chunk ever carries the start of a stop string that later completes, and the
chunks still join to the whole answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class AnswerText:
    """Filters text pieces on their way to `publish`; `add` says when a stop string ended it."""

    def __init__(self, stops: Iterable[str], publish: Callable[[str], None]) -> None:
        self._stops = tuple(dict.fromkeys(stop for stop in stops if stop))
        self._publish = publish
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self._started = False
        self._parts: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything published so far."""
        return "".join(self._parts)

    def add(self, piece: str) -> bool:
        """Take the next piece of model text; True once a stop string has ended the answer."""
        if self.stopped:
            return True
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return False
            self._started = True
        held = self._held + piece
        cut = self._first_stop(held)
        if cut is not None:
            self._held = ""
            self.stopped = True
            self._emit(held[:cut])
            return True
        keep = self._could_become_stop(held)
        self._held = held[len(held) - keep :] if keep else ""
        self._emit(held[: len(held) - keep])
        return False

    def finish(self) -> None:
        """The answer is over: publish what was held back (it did not become a stop string)."""
        held, self._held = self._held, ""
        self._emit(held)

    def _first_stop(self, text: str) -> int | None:
        found = [index for stop in self._stops if (index := text.find(stop)) >= 0]
        return min(found) if found else None

    def _could_become_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _emit(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._publish(text)
