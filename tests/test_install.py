"""scripts/install and scripts/uninstall in --dry-run: the plan is printed, nothing is changed.

Every command that changes the system is replaced by a stub that records its call and fails, so a
dry run that executed anything shows up in the record (and could not have done harm), whatever user
the tests run as.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL = REPO_ROOT / "scripts" / "install"
UNINSTALL = REPO_ROOT / "scripts" / "uninstall"
MUTATING_COMMANDS = (
    "apt-get",
    "useradd",
    "groupadd",
    "userdel",
    "groupdel",
    "install",
    "cp",
    "rm",
    "rmdir",
    "runuser",
    "chown",
    "chmod",
)
# Queries the scripts may make while planning; anything else systemctl is asked is a change.
SYSTEMCTL_QUERIES = ("is-active", "cat", "is-enabled", "show")


@pytest.fixture
def stubbed_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH leads every state-changing command to a recording stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    calls.touch()
    for name in MUTATING_COMMANDS:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        stub.chmod(0o755)
    queries = "|".join(SYSTEMCTL_QUERIES)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        f'case "$1" in {queries}) exit 1 ;; esac\n'
        f'echo "systemctl $*" >> "{calls}"\nexit 1\n'
    )
    systemctl.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
    return env, calls


def run_script(
    script: Path, *args: str, env: dict[str, str], user: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        user=user,
    )


def planned_commands(output: str) -> list[str]:
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("board", ["pi", "jetson", "generic"])
def test_install_dry_run_prints_the_whole_plan_and_changes_nothing(
    stubbed_path: tuple[dict[str, str], Path], board: str
) -> None:
    env, calls = stubbed_path

    result = run_script(INSTALL, "--dry-run", "--board", board, env=env)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "", "a dry run executed commands"
    out = result.stdout
    assert f"board: {board} (--board)" in out
    assert out.rstrip().endswith("dry run complete: nothing was changed")
    plan = planned_commands(out)
    assert any(c.startswith("install -m 0644 ") and c.endswith("kioskd.service") for c in plan)
    assert any(
        c.startswith("install -m 0640") and "/etc/kioskd/kioskd.yaml" in c for c in plan
    ) or ("keeping existing /etc/kioskd/kioskd.yaml" in out)
    assert "systemctl daemon-reload" in plan
    assert [c for c in plan if c.startswith(("systemctl enable", "systemctl restart"))]
    assert [c for c in plan if "check-config" in c]
    [llama_build] = [c for c in plan if "CMAKE_ARGS=" in c]
    assert ("-DGGML_CUDA=on" in llama_build) == (board == "jetson")
    assert "--no-binary llama-cpp-python" in llama_build
    assert [c for c in plan if c.endswith(("[systemd\\]", "[systemd]"))]
    dropins = [c for c in plan if "kioskd.service.d/" in c and c.startswith("install -m")]
    expected = {"pi": ["raspberry-pi.conf"], "jetson": ["jetson.conf"], "generic": []}[board]
    assert [c.rsplit("/", 1)[1] for c in dropins] == expected


def test_install_rejects_an_unknown_board(stubbed_path: tuple[dict[str, str], Path]) -> None:
    env, calls = stubbed_path

    result = run_script(INSTALL, "--dry-run", "--board", "pi4", env=env)

    assert result.returncode != 0
    assert "unknown board" in result.stderr
    assert calls.read_text() == ""


@pytest.mark.parametrize("purge", [False, True])
def test_uninstall_dry_run_prints_the_plan_and_changes_nothing(
    stubbed_path: tuple[dict[str, str], Path], purge: bool
) -> None:
    env, calls = stubbed_path

    result = run_script(UNINSTALL, "--dry-run", *(["--purge"] if purge else []), env=env)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == ""
    out = result.stdout
    assert "/opt/kioskd" in out
    assert "/etc/systemd/system/kioskd.service" in out
    assert ("keeping /etc/kioskd" in out) == (not purge)
    assert out.rstrip().endswith("dry run complete: nothing was changed")


def accessible_to_others(path: Path) -> bool:
    """Whether an unprivileged user can reach and read `path` (a checkout under /root cannot)."""
    for directory in path.parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=["install", "uninstall"])
def test_real_run_refuses_without_root(
    stubbed_path: tuple[dict[str, str], Path], script: Path
) -> None:
    env, calls = stubbed_path
    user = None
    if os.geteuid() == 0:
        if not accessible_to_others(script):
            pytest.skip("running as root and the checkout is not readable by nobody")
        # nobody cannot reach the stubs in the private tmp_path, but cannot change anything either.
        user = 65534

    result = run_script(script, env=env, user=user)

    assert result.returncode == 1
    assert "run as root" in result.stderr
    assert calls.read_text() == ""
