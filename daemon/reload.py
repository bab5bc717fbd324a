"""SIGHUP: which changed keys take effect at once, and which wait for a restart.

Live keys touch only parts that read their setting on every use (the log level, the telemetry
loop, the thermal governor, intake limits, the queue bound). Everything else (the broker
connection, the model, topics) is built once at start; changing it under a running kiosk would
strand questions, so those keys are named in the log and left as they were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from daemon.config import Config

LIVE_SECTIONS = ("logging", "telemetry", "thermal", "limits", "queue")
# Keys inside live sections that still need a restart.
_RESTART_ONLY = frozenset({"telemetry.sys_root", "telemetry.vcgencmd", "limits.dedup_max_ids"})


@dataclass(frozen=True)
class ReloadPlan:
    live_keys: tuple[str, ...]
    restart_keys: tuple[str, ...]


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """The changed keys, split into those applied now and those that need a restart."""
    before, after = _flatten(running), _flatten(new)
    changed = [key for key in after if before.get(key) != after[key]]
    live = tuple(key for key in changed if _is_live(key))
    return ReloadPlan(live, tuple(key for key in changed if key not in live))


def replace_live(running: Config, new: Config) -> Config:
    """`running` with the live keys taken from `new`."""
    sections: dict[str, Any] = {}
    for name in LIVE_SECTIONS:
        kept = {
            field.name: getattr(getattr(running, name), field.name)
            for field in dataclasses.fields(getattr(running, name))
            if not _is_live(f"{name}.{field.name}")
        }
        sections[name] = dataclasses.replace(getattr(new, name), **kept)
    return dataclasses.replace(running, **sections)


def _is_live(key: str) -> bool:
    return key.split(".", 1)[0] in LIVE_SECTIONS and key not in _RESTART_ONLY


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            flat.update(_flatten(item, f"{key}."))
        else:
            flat[key] = item
    return flat
