"""What a key left null takes from the machine: the device id and the number of threads."""

from __future__ import annotations

import os
import re


def sanitize_device_id(name: str) -> str:
    """Lower-case `name` and replace characters outside [a-z0-9_-] with '-' (docs/protocol.md)."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower()) or "kiosk"


def default_threads() -> int:
    """Physical cores minus one, leaving a core for the broker client and the OS."""
    import psutil  # noqa: PLC0415 - only needed when the operator left threads unset

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, physical - 1)
