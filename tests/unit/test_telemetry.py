"""TelemetryReader against fixture /sys trees and fake vcgencmd scripts (the hardware seams)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from daemon.telemetry import Telemetry, TelemetryReader
from daemon.throttleflags import ThrottleState, decode_throttled, parse_throttled

FIXTURES = Path(__file__).parents[1] / "fixtures"
SYS = FIXTURES / "sys"
BIN = FIXTURES / "bin"
NO_VCGENCMD = (str(FIXTURES / "bin" / "no-such-vcgencmd"), "get_throttled")

EXPECTED_ZONES: dict[str, dict[str, float | None]] = {
    "pi5": {"cpu-thermal": 52.7},
    "jetson_orin": {
        "cpu-thermal": 47.3,
        "gpu-thermal": 45.3,
        "cv0-thermal": None,
        "cv1-thermal": None,
        "cv2-thermal": None,
        "soc0-thermal": 46.6,
        "soc1-thermal": 46.2,
        "soc2-thermal": 45.9,
        "tj-thermal": 48.3,
    },
    "jetson_nano": {
        "AO-therm": 36.5,
        "CPU-therm": 38.5,
        "GPU-therm": 36.0,
        "PLL-therm": 35.5,
        "PMIC-Die": 100.0,
        "thermal-fan-est": 37.1,
    },
    "x86": {
        "acpitz": 27.8,
        "acpitz_2": 29.8,
        "INT3400 Thermal": 20.0,
        "iwlwifi_1": None,
        "SEN1": None,
        "pch_cannonlake": None,
        "x86_pkg_temp": 51.0,
        "B0D4": 49.0,
        "TCPU": 49.1,
        "TMEM": 40.0,
        "TSKN": 33.0,
    },
}
EXPECTED_CPU_C = {"pi5": 52.7, "jetson_orin": 47.3, "jetson_nano": 38.5, "x86": 51.0}
EXPECTED_FREQ_MHZ = {"pi5": 2400, "jetson_orin": 1510, "jetson_nano": 1479, "x86": None}

FLAG_NAMES = {
    "under_voltage_now",
    "arm_frequency_capped_now",
    "throttled_now",
    "soft_temperature_limit_now",
    "under_voltage_occurred",
    "arm_frequency_capped_occurred",
    "throttled_occurred",
    "soft_temperature_limit_occurred",
}


def write_zone(sys_root: Path, index: int, zone_type: str | None, temp: str | None) -> None:
    zone_dir = sys_root / "class" / "thermal" / f"thermal_zone{index}"
    zone_dir.mkdir(parents=True)
    if zone_type is not None:
        (zone_dir / "type").write_text(f"{zone_type}\n")
    if temp is not None:
        (zone_dir / "temp").write_text(f"{temp}\n")


def zone_tree(tmp_path: Path, *zones: tuple[str, str]) -> Path:
    for index, (zone_type, temp) in enumerate(zones):
        write_zone(tmp_path, index, zone_type, temp)
    return tmp_path


@pytest.mark.parametrize("board", sorted(EXPECTED_ZONES))
def test_fixture_boards_report_every_zone_in_kernel_order(board: str) -> None:
    thermal = TelemetryReader(SYS / board, vcgencmd=NO_VCGENCMD).read_thermal()

    assert list(thermal.zones.items()) == list(EXPECTED_ZONES[board].items())
    assert thermal.cpu_c == EXPECTED_CPU_C[board]


@pytest.mark.parametrize("board", sorted(EXPECTED_ZONES))
def test_full_read_has_every_protocol_field(board: str) -> None:
    telemetry = TelemetryReader(SYS / board, vcgencmd=NO_VCGENCMD).read()
    health = telemetry.to_dict()

    assert set(health) == {"cpu", "memory", "thermal"}
    assert set(health["cpu"]) == {"percent", "per_core", "freq_mhz", "load"}
    assert set(health["memory"]) == {"total_mb", "available_mb", "rss_mb"}
    assert set(health["thermal"]) == {"cpu_c", "zones", "throttled"}
    assert set(health["thermal"]["throttled"]) == {"now", "since_boot", "flags"}
    assert health["cpu"]["freq_mhz"] == EXPECTED_FREQ_MHZ[board]
    assert health["thermal"]["zones"] == EXPECTED_ZONES[board]
    # JSON-ready as is: plain lists and dicts, no NaN.
    assert json.loads(json.dumps(health, allow_nan=False)) == health


def test_psutil_fields_hold_real_values_of_this_machine() -> None:
    reader = TelemetryReader(SYS / "pi5", vcgencmd=NO_VCGENCMD)
    # CPU percent compares with the previous sample: let a few clock ticks pass.
    time.sleep(0.05)
    health = reader.read().to_dict()

    cpu, memory = health["cpu"], health["memory"]
    assert cpu["percent"] is not None
    assert 0.0 <= cpu["percent"] <= 100.0
    assert cpu["per_core"] is not None
    assert len(cpu["per_core"]) == psutil.cpu_count()
    assert all(0.0 <= core <= 100.0 for core in cpu["per_core"])
    assert cpu["load"] is not None
    assert len(cpu["load"]) == 3
    assert all(load >= 0.0 for load in cpu["load"])
    total_mb = round(psutil.virtual_memory().total / 2**20)
    assert memory["total_mb"] == total_mb
    assert memory["available_mb"] is not None
    assert 0 < memory["available_mb"] <= total_mb
    rss_mb = round(psutil.Process().memory_info().rss / 2**20)
    assert memory["rss_mb"] is not None
    assert abs(memory["rss_mb"] - rss_mb) <= 16


def test_first_cpu_percent_is_meaningful_even_from_another_thread() -> None:
    # psutil.cpu_percent(interval=None) keeps its baseline per thread: a reader primed on the main
    # thread and read on the health thread would report ~0 % here.
    reader = TelemetryReader(SYS / "pi5", vcgencmd=NO_VCGENCMD)
    busy_until = time.monotonic() + 0.15
    while time.monotonic() < busy_until:
        pass
    results: list[Telemetry] = []
    worker = threading.Thread(target=lambda: results.append(reader.read()))
    worker.start()
    worker.join()

    cpu = results[0].cpu
    assert cpu.percent is not None
    # One of N cores spun for the whole interval.
    assert cpu.percent >= 100 / psutil.cpu_count() / 2
    assert cpu.per_core is not None
    # The spinning thread may hop between cores, but together they were at least half busy.
    assert sum(cpu.per_core) >= 50.0


def test_rss_of_a_vanished_process_is_null() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()

    memory = TelemetryReader(SYS / "pi5", vcgencmd=NO_VCGENCMD, pid=child.pid).read().memory

    assert memory.rss_mb is None
    assert memory.total_mb is not None


def test_rss_follows_the_given_pid() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        # Only once it has started up does its RSS stay put between the two reads.
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        memory = TelemetryReader(SYS / "pi5", vcgencmd=NO_VCGENCMD, pid=child.pid).read().memory
        expected_mb = round(psutil.Process(child.pid).memory_info().rss / 2**20)
    finally:
        child.communicate(b"")
    assert memory.rss_mb is not None
    assert abs(memory.rss_mb - expected_mb) <= 2


def test_missing_sys_root_reports_null_not_an_error(tmp_path: Path) -> None:
    thermal = TelemetryReader(tmp_path / "absent", vcgencmd=NO_VCGENCMD).read()

    assert thermal.thermal.cpu_c is None
    assert thermal.thermal.zones == {}
    assert thermal.cpu.freq_mhz is None


@pytest.mark.parametrize(
    ("temp", "expected_c"),
    [
        ("54200", 54.2),
        ("-40000", -40.0),
        ("150000", 150.0),
        ("150001", None),
        ("-40001", None),
        ("-256000", None),
        ("", None),
        ("54.2", None),
        ("N/A", None),
        ("\x00\xff", None),
    ],
)
def test_temperature_sanity(tmp_path: Path, temp: str, expected_c: float | None) -> None:
    sys_root = zone_tree(tmp_path, ("cpu-thermal", temp))

    thermal = TelemetryReader(sys_root, vcgencmd=NO_VCGENCMD).read_thermal()

    assert thermal.zones == {"cpu-thermal": expected_c}
    assert thermal.cpu_c == expected_c


def test_temp_that_cannot_be_read_is_null(tmp_path: Path) -> None:
    write_zone(tmp_path, 0, "cpu-thermal", None)
    (tmp_path / "class" / "thermal" / "thermal_zone0" / "temp").mkdir()
    write_zone(tmp_path, 1, None, "41000")

    thermal = TelemetryReader(tmp_path, vcgencmd=NO_VCGENCMD).read_thermal()

    # A zone without a type keeps its directory name rather than vanishing.
    assert thermal.zones == {"cpu-thermal": None, "thermal_zone1": 41.0}
    assert thermal.cpu_c is None


def test_repeated_zone_names_all_survive(tmp_path: Path) -> None:
    sys_root = zone_tree(
        tmp_path,
        ("acpitz", "30000"),
        ("acpitz_2", "31000"),
        ("acpitz", "32000"),
        ("acpitz", "33000"),
    )

    zones = TelemetryReader(sys_root, vcgencmd=NO_VCGENCMD).read_thermal().zones

    assert zones == {"acpitz": 30.0, "acpitz_2": 31.0, "acpitz_3": 32.0, "acpitz_4": 33.0}


@pytest.mark.parametrize(
    ("zones", "expected_c"),
    [
        # Orin: the CPU zone wins over the hotter junction zone.
        ((("tj-thermal", "60000"), ("cpu-thermal", "55000")), 55.0),
        # No CPU zone: fall back to the junction.
        ((("soc0-thermal", "50000"), ("tj-thermal", "52000")), 52.0),
        # CPU zone present but unreadable: the junction still gives an honest upper bound.
        ((("cpu-thermal", "-256000"), ("tj-thermal", "52000")), 52.0),
        ((("CPU-therm", "40000"), ("Tboard_tegra", "35000"), ("GPU-therm", "39000")), 40.0),
        ((("acpitz", "30000"), ("coretemp", "45000")), 45.0),
        ((("acpitz", "30000"), ("k10temp", "46000")), 46.0),
        ((("acpitz", "30000"), ("iwlwifi_1", "35000")), 30.0),
        # Zones that are not the CPU never stand in for it.
        ((("gpu-thermal", "50000"), ("soc0-thermal", "49000")), None),
        ((("cpu-thermal", "garbage"),), None),
    ],
)
def test_cpu_zone_choice(
    tmp_path: Path, zones: tuple[tuple[str, str], ...], expected_c: float | None
) -> None:
    sys_root = zone_tree(tmp_path, *zones)

    assert TelemetryReader(sys_root, vcgencmd=NO_VCGENCMD).cpu_temp_c() == expected_c


def test_cpu_temp_c_does_not_run_vcgencmd() -> None:
    reader = TelemetryReader(
        SYS / "pi5", vcgencmd=(str(BIN / "vcgencmd-hang"), "get_throttled"), vcgencmd_timeout_s=3
    )
    started = time.monotonic()

    assert reader.cpu_temp_c() == 52.7
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("output", "now", "since_boot", "flags"),
    [
        ("throttled=0x0\n", False, False, set()),
        (
            "throttled=0x50005\n",
            True,
            True,
            {"under_voltage_now", "throttled_now", "under_voltage_occurred", "throttled_occurred"},
        ),
        ("throttled=0x80000\n", False, True, {"soft_temperature_limit_occurred"}),
        ("throttled=0x8", True, False, {"soft_temperature_limit_now"}),
        ("throttled=0x2", True, False, {"arm_frequency_capped_now"}),
        (
            "throttled=0xE0000",
            False,
            True,
            {
                "arm_frequency_capped_occurred",
                "throttled_occurred",
                "soft_temperature_limit_occurred",
            },
        ),
        ("throttled=0xF000F", True, True, FLAG_NAMES),
        # Bits the firmware does not define are ignored, not guessed at.
        ("throttled=0x100", False, False, set()),
    ],
)
def test_throttle_flag_decoding(output: str, now: bool, since_boot: bool, flags: set[str]) -> None:
    state = parse_throttled(output)

    assert state.now is now
    assert state.since_boot is since_boot
    assert set(state.flags) == flags
    assert len(state.flags) == len(flags)


def test_decode_names_each_bit_once() -> None:
    for bit in (*range(4), *range(16, 20)):
        assert len(decode_throttled(1 << bit).flags) == 1
    assert decode_throttled(0xF000F).flags == (
        "under_voltage_now",
        "arm_frequency_capped_now",
        "throttled_now",
        "soft_temperature_limit_now",
        "under_voltage_occurred",
        "arm_frequency_capped_occurred",
        "throttled_occurred",
        "soft_temperature_limit_occurred",
    )


@pytest.mark.parametrize("output", ["", "VCHI initialization failed", "throttled=", "0x50005"])
def test_garbled_vcgencmd_output_is_unknown(output: str) -> None:
    assert parse_throttled(output) == ThrottleState(now=None, since_boot=None, flags=())


def test_throttled_pi_via_fake_vcgencmd() -> None:
    reader = TelemetryReader(
        SYS / "pi5", vcgencmd=(str(BIN / "vcgencmd-throttled"), "get_throttled")
    )

    throttled = reader.read().to_dict()["thermal"]["throttled"]

    assert throttled == {
        "now": True,
        "since_boot": True,
        "flags": [
            "under_voltage_now",
            "throttled_now",
            "under_voltage_occurred",
            "throttled_occurred",
        ],
    }


def test_healthy_pi_via_fake_vcgencmd() -> None:
    reader = TelemetryReader(SYS / "pi5", vcgencmd=(str(BIN / "vcgencmd-ok"), "get_throttled"))

    assert reader.read_thermal().throttled == ThrottleState(now=False, since_boot=False, flags=())


@pytest.mark.parametrize(
    "vcgencmd",
    [
        None,
        NO_VCGENCMD,
        (str(BIN / "vcgencmd-vchi-failed"), "get_throttled"),
        # The fake insists on the get_throttled argument and fails without it.
        (str(BIN / "vcgencmd-throttled"), "measure_temp"),
    ],
)
def test_no_usable_vcgencmd_means_unknown_throttle(vcgencmd: tuple[str, str] | None) -> None:
    reader = TelemetryReader(SYS / "x86", vcgencmd=vcgencmd)

    for _ in range(2):
        throttled = reader.read().to_dict()["thermal"]["throttled"]
        assert throttled == {"now": None, "since_boot": None, "flags": []}


def test_hung_vcgencmd_is_cut_off_by_the_timeout() -> None:
    reader = TelemetryReader(
        SYS / "pi5", vcgencmd=(str(BIN / "vcgencmd-hang"), "get_throttled"), vcgencmd_timeout_s=0.2
    )
    started = time.monotonic()

    thermal = reader.read_thermal()

    assert time.monotonic() - started < 2.0
    assert thermal.throttled == ThrottleState(now=None, since_boot=None, flags=())
    # The zones are still read when the firmware does not answer.
    assert thermal.cpu_c == 52.7


def test_fake_vcgencmd_scripts_are_executable() -> None:
    # Git keeps the mode bit; without it every throttle test above would quietly read "unknown".
    for script in BIN.iterdir():
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
