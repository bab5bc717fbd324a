"""The kiosk as a device: health and heat, Home Assistant, the watchdog, the screen, logs."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config.keys import _at_least, _between, _key, _topic_prefix
from daemon.config.listen import parse_listen


def _command(value: list[str] | None) -> str | None:
    return None if value is None or value else "must be a non-empty list, or null to disable"


@dataclass(frozen=True)
class TelemetryConfig:
    """Health publishing and where the hardware readings come from."""

    interval_s: float = _key(
        30.0, "seconds between retained P/health messages and thermal checks", _at_least(0.2)
    )
    sys_root: str = _key("/sys", "root of the sysfs tree with thermal zones and cpufreq")
    vcgencmd: list[str] | None = _key(
        ["vcgencmd", "get_throttled"], "Raspberry Pi throttle query; null = not a Pi", _command
    )


@dataclass(frozen=True)
class ThermalConfig:
    """Thermal back-off: work less hard instead of letting the firmware throttle."""

    soft_limit_c: float = _key(
        75.0, "at or above: one generation thread fewer per telemetry interval, down to 1"
    )
    hard_limit_c: float = _key(82.0, "at or above: no new generations (error overheated)")
    resume_below_c: float = _key(
        70.0, "below: take questions again and add back one thread per interval"
    )


@dataclass(frozen=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery."""

    enabled: bool = _key(False, "publish discovery configs so Home Assistant shows this kiosk")
    prefix: str = _key("homeassistant", "Home Assistant's discovery prefix", _topic_prefix)


@dataclass(frozen=True)
class WatchdogConfig:
    """systemd watchdog: when to stop pinging so that a hung daemon is restarted."""

    stall_s: float = _key(
        90.0, "a generation with no new token for this long counts as hung", _between(1, 3600)
    )


def _listen(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class WebConfig:
    """`kioskd web`, the touch page for a screen (docs/security.md, "The kiosk screen")."""

    listen: str = _key(
        "127.0.0.1:8080",
        "HOST:PORT the kiosk screen's web service listens on; a non-loopback host needs "
        "web.allow_remote",
        _listen,
    )
    allow_remote: bool = _key(
        False, "allow web.listen off loopback: anyone who reaches it may ask and cancel"
    )


def _log_level(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in levels else "must be one of " + ", ".join(levels)


@dataclass(frozen=True)
class LoggingConfig:
    """Log output."""

    level: str = _key(
        "INFO", "DEBUG, INFO, WARNING or ERROR; question text is logged only at DEBUG", _log_level
    )
