"""scripts/install and scripts/uninstall: the printed plan, and a real install in a throwaway root.

The dry runs replace every command that changes the system by a stub that records its call and
fails, so a dry run that executed anything shows up in the record (and could not have done harm),
whatever user the tests run as.

The real runs install into a fresh directory with `--root`, as an SD-card image is built: no
running systemd, the kioskd user added to <root>/etc/passwd with `useradd --prefix` (which edits
those files directly, with no chroot, so the root needs no binaries of its own), the venv made
from this machine's /usr/bin/python3. llama-cpp-python is not compiled here: the generic profile's
wheel directory is seeded once with the wheel scripts/setup built (pip's wheel cache), which is
llama.cpp's default build for this machine, the same as the generic profile's -DGGML_NATIVE=ON.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from daemon import exitcodes

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    "ln",
    "mv",
)
# Queries the scripts may make while planning; anything else systemctl is asked is a change.
SYSTEMCTL_QUERIES = ("is-active", "is-failed", "cat", "is-enabled", "show")
SYSTEMD_RUNNING = Path("/run/systemd/system").is_dir()


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
    if SYSTEMD_RUNNING:
        assert "systemctl daemon-reload" in plan
    else:
        assert "systemctl daemon-reload" not in plan
        assert "skipped systemctl daemon-reload: no running systemd" in out
    assert [c for c in plan if c.startswith(("systemctl enable", "systemctl restart"))]
    assert [c for c in plan if "check-config" in c and c.startswith("setpriv --reuid=")]
    [llama_build] = [c for c in plan if "CMAKE_ARGS=" in c]
    assert ("-DGGML_CUDA=on" in llama_build) == (board == "jetson")
    # A Jetson's CUDA build must also be told to put the model on the GPU.
    offload = [c for c in plan if c.startswith("sed -i") and "gpu_layers" in c and "999" in c]
    if "keeping existing /etc/kioskd/kioskd.yaml" not in out:
        assert bool(offload) == (board == "jetson")
    # Built from source, and never handed back from pip's wheel cache whatever CMAKE_ARGS say.
    assert " wheel --no-deps --no-cache-dir --no-binary llama-cpp-python " in llama_build
    assert "ln -s /opt/kioskd/venv/bin/kioskd /usr/local/bin/kioskd" in plan
    assert [c for c in plan if c.endswith(("[systemd\\]", "[systemd]"))]
    dropins = [c for c in plan if "kioskd.service.d/" in c and c.startswith("install -m")]
    expected = {"pi": ["raspberry-pi.conf"], "jetson": ["jetson.conf"], "generic": []}[board]
    assert [c.rsplit("/", 1)[1] for c in dropins] == expected


@pytest.mark.parametrize("with_web", [False, True])
def test_install_offers_the_screen_service(
    stubbed_path: tuple[dict[str, str], Path], with_web: bool
) -> None:
    env, calls = stubbed_path

    flags = ["--with-web"] if with_web else []
    result = run_script(INSTALL, "--dry-run", "--board", "generic", *flags, env=env)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "", "a dry run executed commands"
    plan = planned_commands(result.stdout)
    web_steps = [c for c in plan if "kioskd-web.service" in c]
    if not with_web:
        assert web_steps == [], "no screen service unless asked for (or already installed)"
        return
    assert any(
        c.startswith("install -m 0644 ") and c.endswith("/etc/systemd/system/kioskd-web.service")
        for c in web_steps
    )
    assert [c for c in web_steps if c.startswith("systemctl") and " enable" in c]
    assert "kiosk screen: http://127.0.0.1:8080/" in result.stdout


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
    assert "kioskd-web.service" in out, "the screen's unit is looked for too"
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


def build_key(output: str) -> str:
    match = re.search(r"llama\.cpp build key: ([0-9a-f]{16}) ", output)
    assert match, output
    return match.group(1)


def test_install_takes_a_system_python_not_the_first_on_path(
    stubbed_path: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = stubbed_path
    # A pyenv-style shim first on PATH, as in a root shell with pyenv or conda.
    shims = tmp_path / "shims"
    shims.mkdir()
    decoy = shims / "python3"
    decoy.write_text('#!/bin/sh\necho "the decoy ran" >&2\nexec /usr/bin/python3 "$@"\n')
    decoy.chmod(0o755)
    env = {**env, "PATH": f"{shims}:{env['PATH']}"}

    result = run_script(INSTALL, "--dry-run", "--board", "generic", env=env)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == ""
    assert "the decoy ran" not in result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.strip().startswith("python: ")]
    assert re.fullmatch(r"\s+python: /usr/bin/python3(\.\d+)? \(3\.\d+\)", line), line
    plan = planned_commands(result.stdout)
    assert [
        c
        for c in plan
        if c.startswith("/usr/bin/python3") and c.endswith("-m venv /opt/kioskd/venv")
    ]


def test_jetson_profile_builds_the_cuda_backend_for_the_boards_gpu(
    stubbed_path: tuple[dict[str, str], Path],
) -> None:
    """No CUDA build here: the flags and the key it is kept under are what can be checked."""
    env, _calls = stubbed_path
    keys = {}
    builds = {}
    for board, model in [
        ("jetson", "NVIDIA Jetson AGX Orin Developer Kit"),
        ("jetson", ""),
        ("pi", ""),
        ("generic", ""),
    ]:
        result = run_script(
            INSTALL, "--dry-run", "--board", board, env={**env, "KIOSKD_DEVICE_MODEL": model}
        )
        assert result.returncode == 0, result.stderr
        name = f"{board}:{model}"
        keys[name] = build_key(result.stdout)
        [builds[name]] = [c for c in planned_commands(result.stdout) if "CMAKE_ARGS=" in c]

    orin = builds["jetson:NVIDIA Jetson AGX Orin Developer Kit"]
    assert "-DGGML_CUDA=on" in orin
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in orin
    assert "CUDACXX=/usr/local/cuda/bin/nvcc" in orin
    assert "-DCMAKE_CUDA_ARCHITECTURES" not in builds["jetson:"]
    assert "-DGGML_CUDA" not in builds["pi:"] + builds["generic:"]
    # Every profile has its own wheel directory, so none is ever installed for another.
    assert len(set(keys.values())) == len(keys)
    assert all(f"wheels/{key}.new" in builds[name] for name, key in keys.items())


# --- real runs in a throwaway root ------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="a real install adds a user (useradd), sets owners and runs kioskd as that user: root",
)
# Where the test keeps the generic profile's wheel between runs, like /opt/kioskd/wheels.
TEST_WHEELS = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kioskd-test-wheels"
)


def pip_cached_llama_wheel() -> Path | None:
    """The llama-cpp-python wheel scripts/setup built for this checkout's venv, if pip kept it."""
    version = importlib.metadata.version("llama_cpp_python")
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "--format=abspath", "llama_cpp_python"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    wheels = [Path(p) for p in listed.stdout.split() if f"-{version}-" in Path(p).name]
    return wheels[0] if wheels else None


@pytest.fixture
def target_root() -> Iterator[Path]:
    """An empty system root the service user can traverse (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="kioskd-root-", dir="/tmp"))
    root.chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def install_env() -> dict[str, str]:
    # This venv's bin first on PATH, as when the tests run from it: the installer must not care.
    return {
        **os.environ,
        "LC_ALL": "C",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def run_real(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=install_env(),
    )


@pytest.fixture
def generic_wheels(target_root: Path) -> Path:
    """TEST_WHEELS with a wheel for the generic profile, seeded from scripts/setup's build."""
    plan = run_real(
        INSTALL,
        "--dry-run",
        "--board",
        "generic",
        "--skip-apt",
        "--root",
        str(target_root),
        "--wheel-dir",
        str(TEST_WHEELS),
    )
    assert plan.returncode == 0, plan.stderr
    keyed = TEST_WHEELS / build_key(plan.stdout)
    if not list(keyed.glob("llama_cpp_python-*.whl")):
        built = pip_cached_llama_wheel()
        if built is not None:
            keyed.mkdir(parents=True, exist_ok=True)
            shutil.copy(built, keyed / built.name)
        # Otherwise the install builds it there, once per machine (minutes).
    return TEST_WHEELS


def account(root: Path, name: str, database: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def as_user(
    uid: int, gid: int, *command: str, groups: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    group_option = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(
        # env in between: setpriv execs with root's capabilities still in effect, so a path it
        # execs directly would be searched as root.
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            *group_option,
            "--",
            "/usr/bin/env",
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/"},
    )


@needs_root
def test_a_python_the_service_user_cannot_run_is_refused_before_anything_changes(
    target_root: Path, tmp_path: Path
) -> None:
    # pyenv's layout: an interpreter under a home directory only its owner may enter.
    home = Path(tempfile.mkdtemp(prefix="kioskd-home-", dir="/tmp"))
    try:
        home.chmod(0o700)
        (home / ".pyenv" / "bin").mkdir(parents=True)
        private_python = home / ".pyenv" / "bin" / "python3.11"
        private_python.symlink_to(Path("/usr/bin/python3").resolve())
        before = sorted(p.relative_to(target_root) for p in target_root.rglob("*"))

        result = run_real(
            INSTALL,
            "--board",
            "generic",
            "--skip-apt",
            "--root",
            str(target_root),
            "--python",
            str(private_python),
        )
    finally:
        shutil.rmtree(home)

    assert result.returncode == 1
    assert f"cannot run {private_python}" in result.stderr
    assert "Permission denied" in result.stderr
    assert "--python /usr/bin/python3.X" in result.stderr
    # Refused before the user, the venv or any build.
    assert sorted(p.relative_to(target_root) for p in target_root.rglob("*")) == before
    assert "==> User and group" not in result.stdout


@needs_root
@pytest.mark.timeout(1800)  # only if no wheel could be seeded: then llama.cpp compiles once
@pytest.mark.slow
def test_install_and_uninstall_in_a_root_without_systemd(
    target_root: Path, generic_wheels: Path
) -> None:
    root = target_root
    common = ["--skip-apt", "--root", str(root), "--wheel-dir", str(generic_wheels)]

    first = run_real(INSTALL, "--board", "generic", *common)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "skipped systemctl daemon-reload: no running systemd" in out
    assert "skipped starting kioskd.service: no running systemd" in out
    user = account(root, "kioskd")
    group = account(root, "kioskd", "group")
    assert user is not None
    assert group is not None
    uid, gid = int(user[2]), int(user[3])
    assert gid == int(group[2])
    assert user[5:] == ["/var/lib/kioskd", "/usr/sbin/nologin"]
    for path, mode, owner in [
        ("opt/kioskd", 0o755, (0, 0)),
        ("etc/kioskd", 0o755, (0, 0)),
        ("etc/kioskd/kioskd.yaml", 0o640, (0, gid)),
        ("etc/kioskd/mqtt-password", 0o600, (0, 0)),
        ("var/lib/kioskd", 0o750, (uid, gid)),
        ("var/cache/kioskd", 0o750, (uid, gid)),
        ("etc/systemd/system/kioskd.service", 0o644, (0, 0)),
    ]:
        info = (root / path).stat()
        assert (stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)) == (mode, owner), path
    assert (root / "etc/systemd/system/kioskd.service").read_text() == (
        REPO_ROOT / "systemd" / "kioskd.service"
    ).read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/kioskd.service"
    assert os.readlink(wants) == "/etc/systemd/system/kioskd.service"
    cli_link = root / "usr/local/bin/kioskd"
    assert os.readlink(cli_link) == "/opt/kioskd/venv/bin/kioskd"
    installed_cli = root / "opt/kioskd/venv/bin/kioskd"
    assert installed_cli.is_file()
    venv_python = (root / "opt/kioskd/venv/bin/python").resolve()
    assert str(venv_python).startswith("/usr/bin/python3")
    config = root / "etc/kioskd/kioskd.yaml"

    # The installed CLI checks the config as the service user, as the unit would run it.
    check = as_user(uid, gid, str(installed_cli), "check-config", "--config", str(config))
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout
    # An operator outside the group is told why and what to do; one in it gets past the config.
    outsider = as_user(65534, 65534, str(installed_cli), "status", "--config", str(config))
    assert outsider.returncode == exitcodes.CONFIG_ERROR
    assert f"cannot read {config}: permission denied; run with sudo, or add yourself to group" in (
        outsider.stderr
    )
    member = as_user(
        65534,
        65534,
        str(installed_cli),
        "status",
        "--config",
        str(config),
        "--timeout-s",
        "0.5",
        groups=[gid],
    )
    assert "cannot read" not in member.stderr
    assert member.returncode != exitcodes.CONFIG_ERROR, member.stderr

    # An unchanged profile: nothing is built or reinstalled.
    again = run_real(INSTALL, "--board", "generic", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "llama-cpp-python for these flags is installed; not rebuilt or reinstalled" in again.stdout
    )
    again_plan = planned_commands(again.stdout)
    assert not [c for c in again_plan if " wheel " in c or "--force-reinstall" in c]
    # Another profile: its own wheel directory (built there, or installed from there if an
    # earlier run built it), never the generic wheel.
    pi = run_real(INSTALL, "--dry-run", "--board", "pi", *common)
    assert pi.returncode == 0, pi.stderr
    generic_key, pi_key = build_key(again.stdout), build_key(pi.stdout)
    assert pi_key != generic_key
    pi_plan = planned_commands(pi.stdout)
    assert [
        c
        for c in pi_plan
        if f" --wheel-dir {generic_wheels / pi_key}.new " in c
        or f" --force-reinstall --no-deps {generic_wheels / pi_key}/" in c
    ], pi.stdout
    assert not [c for c in pi_plan if generic_key in c]
    # A Jetson wheel without CUDA (here: this machine's CPU build put in its place) is refused.
    jetson_plan = run_real(INSTALL, "--dry-run", "--board", "jetson", *common)
    assert jetson_plan.returncode == 0, jetson_plan.stderr
    jetson_wheels = generic_wheels / build_key(jetson_plan.stdout)
    generic_wheel = next((generic_wheels / generic_key).glob("*.whl"))
    jetson_wheels.mkdir(exist_ok=True)
    shutil.copy(generic_wheel, jetson_wheels / generic_wheel.name)
    try:
        jetson = run_real(INSTALL, "--board", "jetson", *common)
    finally:
        shutil.rmtree(jetson_wheels)
    assert jetson.returncode == 1
    assert "has no CUDA backend (no libggml-cuda)" in jetson.stderr
    assert (root / "opt/kioskd/venv/.kioskd-llama-build").read_text().strip() == build_key(
        again.stdout
    )

    kept = run_real(UNINSTALL, "--root", str(root))

    assert kept.returncode == 0, kept.stderr
    for gone in ["etc/systemd/system/kioskd.service", "opt/kioskd", "usr/local/bin/kioskd"]:
        assert not (root / gone).exists(), gone
    assert not wants.is_symlink()
    for path in ["etc/kioskd/kioskd.yaml", "var/lib/kioskd", "var/cache/kioskd"]:
        assert (root / path).exists(), path
    assert account(root, "kioskd") is not None
    assert "scripts/uninstall --purge removes them" in kept.stdout

    purged = run_real(UNINSTALL, "--root", str(root), "--purge")

    assert purged.returncode == 0, purged.stderr
    for gone in ["etc/kioskd", "var/lib/kioskd", "var/cache/kioskd"]:
        assert not (root / gone).exists(), gone
    assert account(root, "kioskd") is None
    assert account(root, "kioskd", "group") is None


@needs_root
def test_uninstall_removes_a_wants_link_left_without_its_unit(target_root: Path) -> None:
    wants = target_root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "kioskd.service").symlink_to("/etc/systemd/system/kioskd.service")
    (wants / "other.service").symlink_to("/etc/systemd/system/other.service")

    result = run_real(UNINSTALL, "--root", str(target_root))

    assert result.returncode == 0, result.stderr
    assert not (wants / "kioskd.service").is_symlink()
    assert (wants / "other.service").is_symlink()
