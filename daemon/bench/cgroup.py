"""CPU bandwidth limits for `kioskd bench contention --cpu-quota`: one cgroup per daemon.

cgroup v2 where a cgroup2 mount offers the cpu controller (Pi OS, Debian 12), else the v1 cpu
hierarchy; the groups are removed again whatever happens, and every check reads back from /proc.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

CFS_PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """No cgroup with a CPU bandwidth limit can be made or used here."""


@dataclass(frozen=True)
class CgroupMount:
    kind: str  # "v2" (cgroup2 with the cpu controller) or "v1" (the cpu controller's hierarchy)
    mountpoint: Path
    root: str  # the mount's root inside the hierarchy; /proc/PID/cgroup paths start there


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo field, whose spaces and such come as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def cgroup_mounts(mountinfo: str) -> list[tuple[str, str, Path, set[str]]]:
    """(fstype, root, mountpoint, super options) of every cgroup and cgroup2 mount."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1 :]
        if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            root, mountpoint = _unescape(fields[3]), Path(_unescape(fields[4]))
            mounts.append((tail[0], root, mountpoint, set(tail[2].split(","))))
    return mounts


def cpu_cgroup_mount(mountinfo: str | None = None) -> CgroupMount:
    """A cgroup2 mount offering the cpu controller, else cgroup v1's cpu hierarchy."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    mounts = cgroup_mounts(mountinfo)
    for fstype, root, mountpoint, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                if "cpu" in (mountpoint / "cgroup.controllers").read_text().split():
                    return CgroupMount("v2", mountpoint, root)
    for fstype, root, mountpoint, options in mounts:
        if fstype == "cgroup" and "cpu" in options:
            return CgroupMount("v1", mountpoint, root)
    raise CgroupError(
        "--cpu-quota: no cgroup2 mount offers the cpu controller and no cgroup v1 cpu "
        "hierarchy is mounted"
    )


def _cgroup_in(proc_cgroup: str, kind: str) -> str:
    """A task's cgroup in the hierarchy of `kind`, from its /proc/.../cgroup file."""
    for line in proc_cgroup.splitlines():
        number, controllers, path = line.split(":", 2)
        if kind == "v2" and number == "0" and not controllers:
            return path
        if kind == "v1" and "cpu" in controllers.split(","):
            return path
    raise CgroupError(f"no {kind} cpu cgroup in {proc_cgroup!r}")


@dataclass(frozen=True)
class GroupCheck:
    """Where a process's threads are, read back from /proc, and its group's quota files."""

    pid_cgroup: str
    threads: int
    quota_files: dict[str, str]


@dataclass(frozen=True)
class QuotaGroup:
    """One fresh cgroup with the bench's CPU bandwidth limit."""

    kind: str
    path: Path  # its directory
    cgroup: str  # its path as /proc/PID/cgroup shows it
    quota_us: int

    def quota_files(self) -> dict[str, str]:
        names = ["cpu.max"] if self.kind == "v2" else ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
        return {name: (self.path / name).read_text().strip() for name in names}

    def expected_quota_files(self) -> dict[str, str]:
        if self.kind == "v2":
            return {"cpu.max": f"{self.quota_us} {CFS_PERIOD_US}"}
        return {"cpu.cfs_quota_us": str(self.quota_us), "cpu.cfs_period_us": str(CFS_PERIOD_US)}

    def add(self, pid: int) -> None:
        """Move the process, all its threads, and any children into this cgroup."""
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        for member in pids:
            # cgroup.procs moves a whole thread group; tasks would move a single thread.
            (self.path / "cgroup.procs").write_text(f"{member}\n")
        self.check(pid)

    def check(self, pid: int) -> GroupCheck:
        """Where every thread of `pid` is now, and the quota; CgroupError unless as set up."""
        pid_cgroup = _cgroup_in(Path(f"/proc/{pid}/cgroup").read_text(), self.kind)
        places = thread_cgroups(pid, self.kind)
        quota = self.quota_files()
        if {pid_cgroup, *places.values()} != {self.cgroup} or quota != self.expected_quota_files():
            raise CgroupError(
                f"pid {pid}: threads in {sorted(set(places.values()))}, quota {quota}; expected "
                f"{self.cgroup} with {self.expected_quota_files()}"
            )
        return GroupCheck(pid_cgroup, len(places), quota)

    def throttling(self) -> tuple[int, int, float]:
        """cpu.stat's (periods, throttled periods, throttled ms) so far."""
        stat = dict(
            line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line
        )
        throttled_ms = (
            int(stat["throttled_usec"]) / 1000
            if self.kind == "v2"
            else int(stat["throttled_time"]) / 1_000_000
        )
        return int(stat["nr_periods"]), int(stat["nr_throttled"]), throttled_ms


def thread_cgroups(pid: int, kind: str) -> dict[int, str]:
    """Thread id -> the cgroup that /proc/PID/task/TID/cgroup names, for every thread."""
    places = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            places[int(task.name)] = _cgroup_in((task / "cgroup").read_text(), kind)
    return places


@contextmanager
def quota_groups(
    percent: float, names: Sequence[str], mount: CgroupMount | None = None
) -> Iterator[dict[str, QuotaGroup]]:
    """A fresh cgroup per name, each limited to `percent` % of one CPU; removed on the way out.

    They live in one new parent directly under the mount, so the limit is theirs alone. Any
    process still inside when they go is moved back to the mount's root cgroup first.
    """
    if percent <= 0:
        raise CgroupError(f"--cpu-quota {percent:g}: give a positive percentage of one CPU")
    mount = mount or cpu_cgroup_mount()
    quota_us = max(1000, round(percent / 100 * CFS_PERIOD_US))  # the kernel's minimum is 1 ms
    parent = mount.mountpoint / f"kioskd-bench-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    created: list[Path] = []
    enabled_cpu = False
    try:
        try:
            parent.mkdir()
        except OSError as error:
            raise CgroupError(
                f"--cpu-quota: cannot create a cgroup under {mount.mountpoint} ({error}); "
                "it needs root or a delegated cgroup"
            ) from error
        created.append(parent)
        if mount.kind == "v2":
            enabled_cpu = _enable_cpu(mount.mountpoint)
            _write_control(parent / "cgroup.subtree_control", "+cpu")
        groups = {}
        for name in names:
            path = parent / name
            path.mkdir()
            created.append(path)
            if mount.kind == "v2":
                _write_control(path / "cpu.max", f"{quota_us} {CFS_PERIOD_US}")
            else:
                _write_control(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write_control(path / "cpu.cfs_quota_us", str(quota_us))
            cgroup = "/" + str(Path(mount.root, path.relative_to(mount.mountpoint))).lstrip("/")
            groups[name] = QuotaGroup(mount.kind, path, cgroup, quota_us)
        yield groups
    except BaseException:
        _remove_groups(created, mount, enabled_cpu, strict=False)
        raise
    _remove_groups(created, mount, enabled_cpu, strict=True)


def _write_control(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise CgroupError(f"--cpu-quota: cannot write {value!r} to {path} ({error})") from error


def _enable_cpu(mountpoint: Path) -> bool:
    """Give the mount's root cgroup's children the cpu controller; True if this turned it on."""
    control = mountpoint / "cgroup.subtree_control"
    if "cpu" in control.read_text().split():
        return False
    _write_control(control, "+cpu")
    return True


def _remove_groups(
    created: list[Path], mount: CgroupMount, enabled_cpu: bool, *, strict: bool
) -> None:
    left: list[str] = []
    for path in reversed(created):  # the children before their parent
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it may have ended meanwhile
                    (mount.mountpoint / "cgroup.procs").write_text(f"{pid}\n")
        # Tasks that just ended can keep a cgroup busy for a moment.
        deadline = time.monotonic() + 5
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    left.append(f"{path} ({error})")
                    break
                time.sleep(0.05)
    if enabled_cpu:
        with contextlib.suppress(OSError):  # someone else's cgroups may use it by now
            (mount.mountpoint / "cgroup.subtree_control").write_text("-cpu")
    if left:
        message = f"--cpu-quota: could not remove cgroup(s): {', '.join(left)}"
        if strict:
            raise CgroupError(message)
        print(message, file=sys.stderr, flush=True)
