"""Engine settings for tests that load a model in-process: one thread, a small context, greedy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.engine import EngineSettings

SMALL = {
    "threads": 1,
    "threads_batch": 1,
    "ctx": 512,
    "max_tokens": 8,
    "temperature": 0.0,
    "system_prompt": "Answer briefly.",
    "chat_format": "auto",
}


def small_settings(path: Path, **changes: Any) -> EngineSettings:
    """`EngineSettings` for `path`: SMALL, with `changes` on top."""
    return EngineSettings(path=path, **{**SMALL, **changes})
