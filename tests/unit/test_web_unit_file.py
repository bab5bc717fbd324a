"""kioskd-web.service: its settings, `systemd-analyze verify` and `security`, as for the daemon."""

from __future__ import annotations

import shutil
from pathlib import Path

from daemon import exitcodes
from tests.unit.test_unit_file import (
    KIOSKD,
    SYSTEMD_DIR,
    assert_exposure_within_budget,
    assert_verify_clean,
    directives,
)

UNIT = SYSTEMD_DIR / "kioskd-web.service"


def test_web_unit_runs_kioskd_web_as_the_kiosk_user_with_bounds() -> None:
    unit = directives(UNIT)

    assert unit["ExecStart"] == [f"{KIOSKD} web --config /etc/kioskd/kioskd.yaml"]
    assert unit["ExecStartPre"] == [f"{KIOSKD} check-config --config /etc/kioskd/kioskd.yaml"]
    assert unit["User"] == ["kioskd"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == [str(exitcodes.CONFIG_ERROR)]
    assert unit["LoadCredential"] == ["mqtt-password:/etc/kioskd/mqtt-password"]
    assert [v for v in unit["SetCredential"] if v.startswith("mqtt-password:")]
    for resource in ("MemoryMax", "CPUQuota", "TasksMax", "StartLimitBurst"):
        assert unit.get(resource), f"{resource}= is missing"
    # It keeps no state: nothing of the file system is writable for it.
    assert unit["ProtectSystem"] == ["strict"]
    assert not [key for key in unit if key.endswith("Directory") and key != "WorkingDirectory"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_web_unit_verifies_cleanly(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    unit = system / UNIT.name
    # verify checks that ExecStart= binaries exist; the venv is not installed here.
    unit.write_text(UNIT.read_text().replace(KIOSKD, shutil.which("true") or "/bin/true"))

    assert_verify_clean(unit, tmp_path)


def test_web_unit_security_exposure(tmp_path: Path) -> None:
    assert_exposure_within_budget(UNIT, tmp_path)
