"""How `kioskd ask` and `kioskd chat` show a reply stream on a terminal."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def stream_printer(*, as_json: bool) -> Callable[[dict[str, Any]], None]:
    """How `ask` and `chat` show a stream: the answer's text as it comes (or every message as
    JSON), queue positions and restarts on stderr."""
    shown: list[str] = []  # answer text printed so far

    def show(message: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(message, ensure_ascii=False), flush=True)
            return
        if message.get("restart") and shown:
            # The kiosk crashed and answers again from the start (docs/protocol.md).
            print("\n[the kiosk restarted; the answer starts again]", file=sys.stderr, flush=True)
            shown.clear()
        kind = message.get("type")
        if kind == "chunk":
            shown.append(str(message.get("text", "")))
            print(shown[-1], end="", flush=True)
        elif kind == "queued":
            print(f"[queued, position {message.get('position')}]", file=sys.stderr, flush=True)
        elif kind == "done":
            # With `stream: false` (or a chunk that never came) the text is only here.
            text, so_far = message.get("text"), "".join(shown)
            if isinstance(text, str) and text.startswith(so_far):
                print(text[len(so_far) :], end="", flush=True)

    return show
