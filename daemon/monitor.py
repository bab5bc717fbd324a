"""Once per telemetry interval: read the sensors, apply thermal back-off, publish P/health.

Runs on its own thread, so reading /sys, psutil and vcgencmd never delays a token; the
generation thread only sees a new thread count between two tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.messages import Health
from daemon.telemetry import Telemetry, TelemetryReader
from daemon.thermal import ThermalDecision, ThermalGovernor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What the rest of the daemon contributes to a health message."""

    state: str
    model: dict[str, object]
    queue: dict[str, object]
    counters: dict[str, object]
    last: dict[str, object]
    conversations: dict[str, object]
    # {"prefix", "group", "member"} in a fleet, so `kioskd status --fleet` finds its members.
    fleet: dict[str, object] | None = None


class Monitor:
    """The periodic health and thermal loop."""

    def __init__(
        self,
        *,
        device: str,
        interval_s: float,
        reader: TelemetryReader,
        governor: ThermalGovernor,
        snapshot: Callable[[], Snapshot],
        on_decision: Callable[[ThermalDecision], None],
        publish: Callable[[bytes], None],
    ) -> None:
        self._device = device
        self._interval_s = interval_s
        self._reader = reader
        self._governor = governor
        self._snapshot = snapshot
        self._on_decision = on_decision
        self._publish = publish
        self._started_monotonic = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kioskd-monitor", daemon=True)
        self.last_telemetry: Telemetry | None = None
        self.last_decision: ThermalDecision | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def set_interval(self, interval_s: float) -> None:
        """Apply a new telemetry.interval_s from the next report on."""
        self._interval_s = interval_s
        self._wake.set()

    def set_limits(self, soft_limit_c: float, hard_limit_c: float, resume_below_c: float) -> None:
        """Apply new thermal limits (SIGHUP); the next reading decides with them."""
        with self._lock:
            self._governor.set_limits(soft_limit_c, hard_limit_c, resume_below_c)

    def report(self, *, decide: bool = True) -> None:
        """Read, decide and publish now (also called on lifecycle changes).

        `decide=False` publishes without a thermal decision: the governor steps once per
        reading, so extra readings would make it back off faster than the interval says.
        """
        with self._lock:  # the loop and a lifecycle change may both report at once
            telemetry = self._reader.read()
            self.last_telemetry = telemetry
            if decide:
                thermal = telemetry.thermal
                decision = self._governor.update(thermal.cpu_c, thermal.throttled.now)
                self.last_decision = decision
                if decision.changed:
                    log.warning("thermal: %s", decision.reason)
                    self._on_decision(decision)
            self._publish(self._health(telemetry).to_payload())

    def report_soon(self) -> None:
        """Publish health now on the monitor thread (a state changed), not on the caller's."""
        self._wake.set()

    def _health(self, telemetry: Telemetry) -> Health:
        snapshot = self._snapshot()
        sections = telemetry.to_dict()
        return Health(
            ts=time.time(),
            device=self._device,
            state=snapshot.state,
            uptime_s=int(time.monotonic() - self._started_monotonic),
            cpu=sections["cpu"],
            memory=sections["memory"],
            thermal=sections["thermal"],
            model=snapshot.model,
            queue=snapshot.queue,
            counters=snapshot.counters,
            last=snapshot.last,
            conversations=snapshot.conversations,
            fleet=snapshot.fleet,
        )

    def _loop(self) -> None:
        next_report = time.monotonic() + self._interval_s
        while True:
            woken = self._wake.wait(max(0.0, next_report - time.monotonic()))
            if self._stop.is_set():
                return
            self._wake.clear()
            due = time.monotonic() >= next_report
            if due:
                next_report = time.monotonic() + self._interval_s
            elif woken:
                next_report = min(next_report, time.monotonic() + self._interval_s)
            try:
                self.report(decide=due)
            except Exception:
                log.exception("health report failed; trying again next interval")
