"""What a key left null takes from the machine: the device id, the number of threads, and the
directories of models and saved conversations."""

from __future__ import annotations

import os
import re
from pathlib import Path


def sanitize_device_id(name: str) -> str:
    """Lower-case `name` and replace characters outside [a-z0-9_-] with '-' (docs/protocol.md)."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower()) or "kiosk"


def default_threads() -> int:
    """Physical cores minus one, leaving a core for the broker client and the OS."""
    import psutil  # noqa: PLC0415 - only needed when the operator left threads unset

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, physical - 1)


def data_dir(name: str, configured: str | None = None) -> Path:
    """Where kioskd keeps `name` (models, conversations): the configured directory, else
    systemd's StateDirectory when set, else the XDG data home."""
    if configured:
        return Path(configured).expanduser()
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / name
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "kioskd" / name
