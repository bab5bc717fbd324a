"""SIGHUP: which changed keys take effect at once, and which wait for a restart.

Live keys touch only parts that read their setting on every use (the log level, the telemetry
loop, the thermal governor, intake limits, the queue bound). Everything else (the broker
connection, the model, topics) is built once at start; changing it under a running kiosk would
strand questions, so those keys are named in the log and left as they were.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load

log = logging.getLogger(__name__)

LIVE_SECTIONS = ("logging", "telemetry", "thermal", "limits", "queue")
# Keys inside live sections that still need a restart.
_RESTART_ONLY = frozenset({"telemetry.sys_root", "telemetry.vcgencmd", "limits.dedup_max_ids"})


@dataclass(frozen=True)
class ReloadPlan:
    live_keys: tuple[str, ...]
    restart_keys: tuple[str, ...]


def reload(config_path: Path | None, running: Config, apply: Callable[[Config], None]) -> Config:
    """Read `config_path` again and `apply` the new config; returns the config now running.

    A file that does not load leaves everything as it was; keys that need a restart keep their
    running value and are named in the log.
    """
    if config_path is None:
        log.warning("no config file to reload (started with the built-in defaults)")
        return running
    try:
        new = load(config_path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", "; ".join(exc.problems))
        return running
    plan = plan_reload(running, new)
    for key in plan.restart_keys:
        log.warning("reload: %s changed; it takes effect only after a restart", key)
    apply(new)
    running = replace_live(running, new)
    log.info(
        "reload: applied %s",
        ", ".join(plan.live_keys) if plan.live_keys else "nothing (no live key changed)",
    )
    return running


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
