"""The Raspberry Pi firmware's throttle flags: `vcgencmd get_throttled` decoded for P/health.

Under-voltage, frequency capping and the soft temperature limit, each as happening now and as
having happened since boot; all unknown where there is no vcgencmd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypedDict

# Bit positions of `vcgencmd get_throttled`, from the Raspberry Pi firmware documentation.
_THROTTLE_FLAG_BITS: tuple[tuple[int, str], ...] = (
    (0, "under_voltage_now"),
    (1, "arm_frequency_capped_now"),
    (2, "throttled_now"),
    (3, "soft_temperature_limit_now"),
    (16, "under_voltage_occurred"),
    (17, "arm_frequency_capped_occurred"),
    (18, "throttled_occurred"),
    (19, "soft_temperature_limit_occurred"),
)
_THROTTLE_NOW_MASK = 0x0000F
_THROTTLE_SINCE_BOOT_MASK = 0xF0000
_THROTTLED_RE = re.compile(r"throttled=(0x[0-9a-fA-F]+)")


class ThrottledJson(TypedDict):
    now: bool | None
    since_boot: bool | None
    flags: list[str]


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Raspberry Pi firmware throttle state; all unknown where there is no vcgencmd."""

    now: bool | None
    since_boot: bool | None
    flags: tuple[str, ...] = ()

    def to_dict(self) -> ThrottledJson:
        return {"now": self.now, "since_boot": self.since_boot, "flags": list(self.flags)}


UNKNOWN_THROTTLE = ThrottleState(now=None, since_boot=None)


def decode_throttled(value: int) -> ThrottleState:
    """Name the bits of a `vcgencmd get_throttled` value."""
    flags = tuple(name for bit, name in _THROTTLE_FLAG_BITS if value & (1 << bit))
    return ThrottleState(
        now=bool(value & _THROTTLE_NOW_MASK),
        since_boot=bool(value & _THROTTLE_SINCE_BOOT_MASK),
        flags=flags,
    )


def parse_throttled(output: str) -> ThrottleState:
    """Decode `vcgencmd get_throttled` output such as ``throttled=0x50005``; unknown if garbled."""
    match = _THROTTLED_RE.search(output)
    if match is None:
        return UNKNOWN_THROTTLE
    return decode_throttled(int(match.group(1), 16))
