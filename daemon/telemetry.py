"""System telemetry for P/health: CPU, memory, thermal zones and Raspberry Pi throttle flags.

Every read is best effort and never raises: a value the hardware does not offer, or that cannot
be read right now, is None (JSON null), never a guess. Hardware is reached through two injectable
seams, a /sys root and the vcgencmd command line, so tests run on fixture trees and fake scripts.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import psutil

from daemon.throttleflags import (
    UNKNOWN_THROTTLE,
    ThrottledJson,
    ThrottleState,
    parse_throttled,
)

logger = logging.getLogger(__name__)

VCGENCMD_TIMEOUT_S = 1.0

# Thermal drivers report "no sensor" with sentinels such as -256000 (Jetson, some ACPI zones) or
# with garbage when a device is powered down; anything outside this band is not a real reading.
_MIN_PLAUSIBLE_C = -40.0
_MAX_PLAUSIBLE_C = 150.0

# Zone types that stand for the CPU, best first. Names are compared case-insensitively because
# older Jetsons say "CPU-therm" where Orin and the Pi say "cpu-thermal". The junction zone (tj) is
# only a fallback: it is the hottest point of the SoC, so it over- rather than under-states.
_CPU_ZONE_PRIORITY: tuple[tuple[str, ...], ...] = (
    ("cpu-thermal", "cpu_thermal", "cpu-therm"),
    ("x86_pkg_temp",),
    ("coretemp", "k10temp"),
    ("tj-thermal", "tj-therm"),
    ("acpitz",),
)

_BYTES_PER_MB = 1024 * 1024

# psutil raises its own errors for vanished processes and OSError for unreadable /proc entries;
# NotImplementedError and ValueError cover platforms and kernels that lack a counter.
_READ_ERRORS = (OSError, psutil.Error, NotImplementedError, ValueError)


class CpuJson(TypedDict):
    percent: float | None
    per_core: list[float] | None
    freq_mhz: int | None
    load: list[float] | None


class MemoryJson(TypedDict):
    total_mb: int | None
    available_mb: int | None
    rss_mb: int | None


class ThermalJson(TypedDict):
    cpu_c: float | None
    zones: dict[str, float | None]
    throttled: ThrottledJson


class TelemetryJson(TypedDict):
    cpu: CpuJson
    memory: MemoryJson
    thermal: ThermalJson


@dataclass(frozen=True, slots=True)
class CpuReading:
    percent: float | None
    per_core: tuple[float, ...] | None
    freq_mhz: int | None
    load: tuple[float, float, float] | None

    def to_dict(self) -> CpuJson:
        return {
            "percent": self.percent,
            "per_core": None if self.per_core is None else list(self.per_core),
            "freq_mhz": self.freq_mhz,
            "load": None if self.load is None else list(self.load),
        }


@dataclass(frozen=True, slots=True)
class MemoryReading:
    total_mb: int | None
    available_mb: int | None
    rss_mb: int | None

    def to_dict(self) -> MemoryJson:
        return {
            "total_mb": self.total_mb,
            "available_mb": self.available_mb,
            "rss_mb": self.rss_mb,
        }


@dataclass(frozen=True, slots=True)
class ThermalReading:
    """CPU temperature, every thermal zone by type (None = unreadable), and throttle state."""

    cpu_c: float | None
    zones: Mapping[str, float | None] = field(default_factory=dict)
    throttled: ThrottleState = UNKNOWN_THROTTLE

    def to_dict(self) -> ThermalJson:
        return {
            "cpu_c": self.cpu_c,
            "zones": dict(self.zones),
            "throttled": self.throttled.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The cpu, memory and thermal sections of P/health."""

    cpu: CpuReading
    memory: MemoryReading
    thermal: ThermalReading

    def to_dict(self) -> TelemetryJson:
        return {
            "cpu": self.cpu.to_dict(),
            "memory": self.memory.to_dict(),
            "thermal": self.thermal.to_dict(),
        }


class TelemetryReader:
    """Reads telemetry from psutil, a /sys tree and vcgencmd; safe to call from any thread."""

    def __init__(
        self,
        sys_root: Path = Path("/sys"),
        vcgencmd: Sequence[str] | None = ("vcgencmd", "get_throttled"),
        pid: int | None = None,
        *,
        vcgencmd_timeout_s: float = VCGENCMD_TIMEOUT_S,
    ) -> None:
        self._sys_root = sys_root
        self._vcgencmd: tuple[str, ...] | None = tuple(vcgencmd) if vcgencmd else None
        self._vcgencmd_timeout_s = vcgencmd_timeout_s
        self._process = _open_process(os.getpid() if pid is None else pid)
        self._cpu_lock = threading.Lock()
        # Our own baseline instead of psutil.cpu_percent(interval=None): psutil keeps that baseline
        # per calling thread, so priming it here would not help a read() made on the health thread.
        self._cpu_sample_before = _cpu_sample()
        self._core_samples_before = _per_core_samples()
        self._last_percent: float | None = None
        self._last_per_core: tuple[float, ...] | None = None

    def read(self) -> Telemetry:
        """Read everything for P/health; takes milliseconds, plus vcgencmd on a Pi (1 s at most).

        CPU percentages cover the time since the previous read() (or since construction); they
        are null only if less than one kernel clock tick has passed since then.
        """
        return Telemetry(
            cpu=self._read_cpu(), memory=self._read_memory(), thermal=self.read_thermal()
        )

    def read_thermal(self) -> ThermalReading:
        """Read thermal zones and throttle state only: the cheap poll for the thermal governor."""
        zones, cpu_c = self._read_zones()
        return ThermalReading(cpu_c=cpu_c, zones=zones, throttled=self.read_throttle())

    def cpu_temp_c(self) -> float | None:
        """Read only the CPU temperature, without starting vcgencmd."""
        return self._read_zones()[1]

    def read_throttle(self) -> ThrottleState:
        """Ask the Pi firmware for its throttle flags; unknown where there is no vcgencmd."""
        argv = self._vcgencmd
        if argv is None:
            return UNKNOWN_THROTTLE
        try:
            completed = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self._vcgencmd_timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            # No vcgencmd means this is not a Pi; stop paying for a fork on every poll.
            logger.info("%s not found: not a Raspberry Pi, throttle flags unknown", argv[0])
            self._vcgencmd = None
            return UNKNOWN_THROTTLE
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s took over %.1f s; throttle flags unknown", argv[0], self._vcgencmd_timeout_s
            )
            return UNKNOWN_THROTTLE
        except (OSError, ValueError) as exc:
            logger.debug("cannot run %s: %s", argv[0], exc)
            return UNKNOWN_THROTTLE
        if completed.returncode != 0:
            # Typically "VCHI initialization failed" when the user may not open /dev/vcio.
            logger.debug(
                "%s exited %d: %s", argv[0], completed.returncode, completed.stderr.strip()
            )
            return UNKNOWN_THROTTLE
        return parse_throttled(completed.stdout)

    def _read_zones(self) -> tuple[dict[str, float | None], float | None]:
        zone_dirs = sorted(
            (self._sys_root / "class" / "thermal").glob("thermal_zone*"), key=_zone_index
        )
        zones: dict[str, float | None] = {}
        typed: list[tuple[str, float | None]] = []
        for zone_dir in zone_dirs:
            zone_type = _read_text(zone_dir / "type") or zone_dir.name
            temp_c = _read_millidegrees(zone_dir / "temp")
            zones[_unique_name(zone_type, zones)] = temp_c
            typed.append((zone_type.lower(), temp_c))
        return zones, _pick_cpu_c(typed)

    def _read_cpu(self) -> CpuReading:
        with self._cpu_lock:
            percent, per_core = self._read_cpu_percent()
        return CpuReading(
            percent=percent, per_core=per_core, freq_mhz=self._read_freq_mhz(), load=_read_load()
        )

    def _read_cpu_percent(self) -> tuple[float | None, tuple[float, ...] | None]:
        sample = _cpu_sample()
        if self._cpu_sample_before is not None and sample is not None:
            percent = _busy_percent(self._cpu_sample_before, sample)
            # Two reads within one clock tick have nothing to compare; keep the last figure.
            if percent is not None:
                self._last_percent = percent
        self._cpu_sample_before = sample

        core_samples = _per_core_samples()
        before = self._core_samples_before
        self._core_samples_before = core_samples
        if core_samples is None or before is None or len(before) != len(core_samples):
            # Unreadable, or CPUs went on/offline: old figures no longer describe these cores.
            self._last_per_core = None
        else:
            per_core = [_busy_percent(b, a) for b, a in zip(before, core_samples, strict=True)]
            known = [value for value in per_core if value is not None]
            if len(known) == len(per_core):
                self._last_per_core = tuple(known)
        return self._last_percent, self._last_per_core

    def _read_freq_mhz(self) -> int | None:
        # The fastest policy: on big.LITTLE parts the big cluster runs generation, and thermal
        # capping shows there first.
        policies = (self._sys_root / "devices" / "system" / "cpu" / "cpufreq").glob("policy*")
        freqs_khz = [_read_int(policy / "scaling_cur_freq") for policy in policies]
        known_khz = [khz for khz in freqs_khz if khz is not None and khz > 0]
        return round(max(known_khz) / 1000) if known_khz else None

    def _read_memory(self) -> MemoryReading:
        total_mb: int | None = None
        available_mb: int | None = None
        try:
            memory = psutil.virtual_memory()
            total_mb = round(memory.total / _BYTES_PER_MB)
            available_mb = round(memory.available / _BYTES_PER_MB)
        except _READ_ERRORS as exc:
            logger.debug("cannot read memory: %s", exc)
        rss_mb: int | None = None
        if self._process is not None:
            try:
                rss_mb = round(self._process.memory_info().rss / _BYTES_PER_MB)
            except _READ_ERRORS as exc:
                logger.debug("cannot read RSS of pid %d: %s", self._process.pid, exc)
        return MemoryReading(total_mb=total_mb, available_mb=available_mb, rss_mb=rss_mb)


def _open_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except _READ_ERRORS as exc:
        logger.warning("cannot watch pid %d: %s; rss_mb will be null", pid, exc)
        return None


# (total_s, idle_s) of one CPU or of all together, as counted by the kernel since boot.
_CpuSample = tuple[float, float]


def _cpu_sample() -> _CpuSample | None:
    try:
        return _to_sample(psutil.cpu_times())
    except _READ_ERRORS:
        return None


def _per_core_samples() -> list[_CpuSample] | None:
    try:
        return [_to_sample(times) for times in psutil.cpu_times(percpu=True)]
    except _READ_ERRORS:
        return None


def _to_sample(times: tuple[float, ...]) -> _CpuSample:
    # Linux counts guest time inside user time too; psutil subtracts it the same way.
    guest_s = float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    # Waiting for I/O leaves the CPU free for us, so it counts as idle (psutil agrees).
    idle_s = float(getattr(times, "idle", 0.0)) + float(getattr(times, "iowait", 0.0))
    return float(sum(times)) - guest_s, idle_s


def _busy_percent(before: _CpuSample, after: _CpuSample) -> float | None:
    total_s = after[0] - before[0]
    if total_s <= 0:
        return None
    busy_percent = 100.0 * (total_s - (after[1] - before[1])) / total_s
    return round(min(100.0, max(0.0, busy_percent)), 1)


def _read_load() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return None
    return round(one, 2), round(five, 2), round(fifteen, 2)


def _zone_index(zone_dir: Path) -> int:
    # Numeric order, so thermal_zone10 follows thermal_zone9 and zones keep the kernel's order.
    suffix = zone_dir.name.removeprefix("thermal_zone")
    return int(suffix) if suffix.isdigit() else -1


def _unique_name(zone_type: str, taken: Mapping[str, object]) -> str:
    """Keep every zone when types repeat (several acpitz): the second becomes acpitz_2, ..."""
    if zone_type not in taken:
        return zone_type
    count = 2
    while f"{zone_type}_{count}" in taken:
        count += 1
    return f"{zone_type}_{count}"


def _pick_cpu_c(typed_zones: Sequence[tuple[str, float | None]]) -> float | None:
    for names in _CPU_ZONE_PRIORITY:
        for zone_type, temp_c in typed_zones:
            if zone_type in names and temp_c is not None:
                return temp_c
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_millidegrees(path: Path) -> float | None:
    millidegrees = _read_int(path)
    if millidegrees is None:
        return None
    temp_c = millidegrees / 1000
    if not math.isfinite(temp_c) or not _MIN_PLAUSIBLE_C <= temp_c <= _MAX_PLAUSIBLE_C:
        return None
    return round(temp_c, 1)
