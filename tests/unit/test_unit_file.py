"""The systemd unit and its board drop-ins: settings, `systemd-analyze verify` and `security`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import exitcodes

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "kioskd.service"
DROPINS = {"raspberry-pi": SYSTEMD_DIR / "dropins" / "raspberry-pi.conf"}
DROPINS["jetson"] = SYSTEMD_DIR / "dropins" / "jetson.conf"
KIOSKD = "/opt/kioskd/venv/bin/kioskd"
MAX_EXPOSURE = 1.5
# --offline for `security` arrived in systemd 250.
MIN_SYSTEMD_FOR_OFFLINE = 250


def directives(*paths: Path) -> dict[str, list[str]]:
    """Key -> values in file order; systemd keys repeat, so configparser will not do."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    return path


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={"SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "PATH": "/usr/bin:/bin"},
    )


def systemd_version() -> int:
    first_line = analyze("--version").stdout.splitlines()[0]
    match = re.match(r"systemd (\d+)", first_line)
    assert match, first_line
    return int(match.group(1))


def install_tree(root: Path, dropin: str | None, *, stub_exec: bool = False) -> Path:
    """Lays out <root>/etc/systemd/system the way scripts/install does; returns the unit path."""
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    unit_text = UNIT.read_text()
    if stub_exec:
        # verify checks that ExecStart= binaries exist; the venv is not installed here.
        unit_text = unit_text.replace(KIOSKD, shutil.which("true") or "/bin/true")
    unit = system / UNIT.name
    unit.write_text(unit_text)
    if dropin is not None:
        dropin_dir = system / f"{UNIT.name}.d"
        dropin_dir.mkdir()
        shutil.copy(DROPINS[dropin], dropin_dir / DROPINS[dropin].name)
    return unit


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    return float(match.group(1))


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    unit = directives(UNIT)

    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30"]
    assert unit["Restart"] == ["on-failure"]
    prevented = {int(code) for code in unit["RestartPreventExitStatus"][0].split()}
    assert prevented == {exitcodes.MODEL_UNAVAILABLE, exitcodes.CONFIG_ERROR}
    assert unit["User"] == ["kioskd"]
    assert unit["DynamicUser"] == ["no"]
    assert unit["ExecStart"] == [f"{KIOSKD} run --config /etc/kioskd/kioskd.yaml"]
    assert unit["LoadCredential"] == ["mqtt-password:/etc/kioskd/mqtt-password"]
    # The fallback that keeps a missing password file from failing the unit.
    assert [v for v in unit["SetCredential"] if v.startswith("mqtt-password:")]
    for resource in ("MemoryMax", "CPUQuota", "Nice", "TasksMax", "StartLimitBurst"):
        assert unit.get(resource), f"{resource}= is missing"
    # shutdown.grace_s defaults to 5 s; stopping also publishes "offline" and disconnects.
    assert int(unit["TimeoutStopSec"][0]) >= 5 + 5
    assert any("GOMP_SPINCOUNT=0" in value for value in unit["Environment"])


def start_command(line: str, config: Path) -> list[str]:
    """A unit's Exec line run with this checkout's kioskd and `config` as its config file."""
    argv = shlex.split(line)
    assert argv[0] == KIOSKD, line
    return [
        sys.executable,
        "-m",
        "daemon",
        *(str(config) if arg == "/etc/kioskd/kioskd.yaml" else arg for arg in argv[1:]),
    ]


def test_a_bad_config_stops_the_unit_without_restarts(tmp_path: Path) -> None:
    unit = directives(UNIT)
    # systemd matches RestartPreventExitStatus= against the main process alone; an ExecStartPre=
    # that fails is restarted whatever its status. Only a "-" prefix (failure ignored) is safe.
    assert [line for line in unit.get("ExecStartPre", []) if not line.startswith("-")] == []
    bad = tmp_path / "kioskd.yaml"
    bad.write_text("mqtt:\n  host: localhost\n  prot: 1883\n")
    [start] = unit["ExecStart"]

    result = subprocess.run(
        start_command(start, bad), capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )

    prevented = {int(code) for code in unit["RestartPreventExitStatus"][0].split()}
    success = {int(code) for value in unit.get("SuccessExitStatus", []) for code in value.split()}
    assert result.returncode in prevented - success - {0}, result.stderr
    # The reason, with key and line, goes to the journal (stderr) for `systemctl status`.
    assert f"{bad}:3: mqtt.prot: unknown key (did you mean mqtt.port?)" in result.stderr
    # What the README tells operators about this exit.
    readme = (REPO / "README.md").read_text()
    claim = re.search(r"(\d+) invalid configuration", readme)
    assert claim, "README.md no longer names the exit status of an invalid configuration"
    assert int(claim.group(1)) == result.returncode
    assert "RestartPreventExitStatus" in readme


def test_sandbox_keeps_proc_and_sys_readable_and_resources_syscalls_allowed() -> None:
    for paths in [(UNIT,), *((UNIT, dropin) for dropin in DROPINS.values())]:
        merged = directives(*paths)
        assert "ProcSubset" not in merged, "psutil reads /proc/stat, /proc/meminfo"
        assert merged["ProtectSystem"] == ["strict"]
        filters = merged["SystemCallFilter"]
        assert "@system-service" in filters
        assert "~@privileged" in filters
        assert not [f for f in filters if f.startswith("~") and "@resources" in f]
        assert merged["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_dropins_open_only_their_devices() -> None:
    pi = directives(DROPINS["raspberry-pi"])
    assert "/dev/vcio rw" in pi["DeviceAllow"]
    assert pi["DevicePolicy"] == ["closed"]
    assert pi["SupplementaryGroups"] == ["video"]

    jetson = directives(DROPINS["jetson"])
    assert "/dev/nvmap rw" in jetson["DeviceAllow"]
    assert [d for d in jetson["DeviceAllow"] if d.startswith("/dev/nvhost-ctrl-gpu")]
    assert [d for d in jetson["DeviceAllow"] if d.startswith("/dev/nvgpu/igpu0/")]
    assert jetson["DevicePolicy"] == ["closed"]


@pytest.mark.parametrize("dropin", [None, "raspberry-pi", "jetson"])
def test_verify_reports_nothing(tmp_path: Path, dropin: str | None) -> None:
    unit = install_tree(tmp_path, dropin, stub_exec=True)

    assert_verify_clean(unit, tmp_path)


def test_security_exposure_of_the_unit(tmp_path: Path) -> None:
    assert_exposure_within_budget(UNIT, tmp_path)


def assert_verify_clean(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit and says nothing about it."""
    result = analyze("verify", "--man=no", str(unit), cwd=tmp_path)

    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "kioskd" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def assert_exposure_within_budget(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit at most MAX_EXPOSURE."""
    if systemd_version() < MIN_SYSTEMD_FOR_OFFLINE:
        pytest.skip(
            f"systemd-analyze security --offline needs systemd >= {MIN_SYSTEMD_FOR_OFFLINE}"
        )

    result = analyze("security", "--offline=true", "--no-pager", str(unit), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert exposure(result.stdout) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("dropin", ["raspberry-pi", "jetson"])
def test_security_exposure_with_board_dropin(tmp_path: Path, dropin: str) -> None:
    if systemd_version() < MIN_SYSTEMD_FOR_OFFLINE:
        pytest.skip(
            f"systemd-analyze security --offline needs systemd >= {MIN_SYSTEMD_FOR_OFFLINE}"
        )
    install_tree(tmp_path, dropin)

    result = analyze(
        "security", "--offline=true", "--no-pager", f"--root={tmp_path}", UNIT.name, cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    # The drop-in's own settings must be what was scored.
    assert "PrivateDevices=" in result.stdout
    assert "Service runs with supplementary groups" in result.stdout
    assert exposure(result.stdout) <= MAX_EXPOSURE, result.stdout
