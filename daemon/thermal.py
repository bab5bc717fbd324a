"""Thermal back-off policy: how many threads generation may use, and whether it may run at all.

Pure logic, no I/O: the caller feeds one reading per telemetry interval and applies the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThermalDecision:
    """What generation may do until the next reading."""

    threads: int
    # True: take no new generations (the scheduler answers error/overheated).
    overheated: bool
    # True while running below full speed for thermal reasons: maps to P/health state "throttled".
    throttled: bool
    # True when threads or overheated differ from the previous decision, so the caller logs and
    # reconfigures once per change rather than once per reading.
    changed: bool
    reason: str


class ThermalGovernor:
    """Steps generation threads down when hot and back up, with hysteresis, when cool again.

    Each call to update() applies, in order:

    - At or above ``hard_limit_c``: ``overheated`` becomes True (no new generations).
    - At or above ``soft_limit_c``, or when the Pi firmware reports throttling now (under-voltage
      and frequency capping included: fewer threads draw less current too): one thread fewer,
      down to 1.
    - Strictly below ``resume_below_c``: ``overheated`` clears and, unless the firmware is
      throttling, one thread more, up to ``max_threads``. One step per reading lets the
      temperature show the effect of each step before the next.
    - Between ``resume_below_c`` and ``soft_limit_c``: hold (the hysteresis band), so a kiosk
      hovering around the limit does not flap.

    Unknown temperature (None, or NaN) holds the current state. It never starts a back-off, so a
    board without sensors runs at full speed; and it never counts as cool, so a kiosk that
    overheated stays paused, and says so in ``reason``, until a real reading below
    ``resume_below_c`` arrives: a failed sensor on a hot board must not resume generation.
    ``throttled_now`` None (not a Pi) is simply "no firmware report".
    """

    def __init__(
        self, soft_limit_c: float, hard_limit_c: float, resume_below_c: float, max_threads: int
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads ({max_threads}) must be at least 1")
        self.set_limits(soft_limit_c, hard_limit_c, resume_below_c)
        self._max_threads = max_threads
        self._threads = max_threads
        self._overheated = False

    def set_limits(self, soft_limit_c: float, hard_limit_c: float, resume_below_c: float) -> None:
        """The temperatures that decide; the threads and pause carry over to the next reading."""
        if not soft_limit_c < hard_limit_c:
            raise ValueError(
                f"soft_limit_c ({soft_limit_c}) must be below hard_limit_c ({hard_limit_c})"
            )
        if not resume_below_c < soft_limit_c:
            raise ValueError(
                f"resume_below_c ({resume_below_c}) must be below soft_limit_c ({soft_limit_c})"
            )
        self._soft_limit_c = soft_limit_c
        self._hard_limit_c = hard_limit_c
        self._resume_below_c = resume_below_c

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def overheated(self) -> bool:
        return self._overheated

    @property
    def max_threads(self) -> int:
        return self._max_threads

    def update(self, cpu_c: float | None, throttled_now: bool | None) -> ThermalDecision:
        """Take one reading and decide threads and overheated for the next interval."""
        if cpu_c is not None and math.isnan(cpu_c):
            cpu_c = None
        firmware_throttling = throttled_now is True
        at_hard = cpu_c is not None and cpu_c >= self._hard_limit_c
        at_soft = cpu_c is not None and cpu_c >= self._soft_limit_c
        cool = cpu_c is not None and cpu_c < self._resume_below_c

        threads, overheated = self._threads, self._overheated
        if at_hard:
            overheated = True
        elif cool:
            overheated = False
        if at_soft or firmware_throttling:
            threads = max(1, threads - 1)
        elif cool:
            threads = min(self._max_threads, threads + 1)

        changed = (threads, overheated) != (self._threads, self._overheated)
        self._threads, self._overheated = threads, overheated
        return ThermalDecision(
            threads=threads,
            overheated=overheated,
            throttled=overheated or threads < self._max_threads,
            changed=changed,
            reason=self._reason(cpu_c, firmware_throttling),
        )

    def _reason(self, cpu_c: float | None, firmware_throttling: bool) -> str:
        state = f"threads {self._threads}/{self._max_threads}"
        if self._overheated:
            state += ", new generations paused"
        if cpu_c is None:
            cause = "CPU temperature unknown"
            if firmware_throttling:
                cause += ", firmware reports throttling"
            elif self._overheated:
                cause += f", staying paused until a reading below {self._resume_below_c:g} °C"
            else:
                cause += ", holding"
            return f"{cause}: {state}"
        temp = f"CPU {cpu_c:.1f} °C"
        if cpu_c >= self._hard_limit_c:
            cause = f"{temp} at or above hard limit {self._hard_limit_c:g} °C"
        elif cpu_c >= self._soft_limit_c:
            cause = f"{temp} at or above soft limit {self._soft_limit_c:g} °C"
        elif firmware_throttling:
            cause = f"{temp}, firmware reports throttling"
        elif cpu_c < self._resume_below_c:
            cause = f"{temp} below resume threshold {self._resume_below_c:g} °C"
        else:
            cause = (
                f"{temp} between resume {self._resume_below_c:g} °C"
                f" and soft limit {self._soft_limit_c:g} °C, holding"
            )
        return f"{cause}: {state}"
