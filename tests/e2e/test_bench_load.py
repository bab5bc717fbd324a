"""Smoke tests of `kioskd bench contention` and `chunking`: tiny runs, JSON, invariants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.bench import report
from daemon.bench.cgroup import CgroupError, CgroupMount, cpu_cgroup_mount, quota_groups
from daemon.bench.contention import (
    ContentionResult,
    ContentionSample,
    CpuQuota,
    contention_summary,
    cpu_hogs,
    parse_variants,
)
from daemon.bench.results import Machine, Run, jsonable
from tests.support.daemon import REPO


def _bench(
    tmp_path: Path, model_path: Path, benchmark: str, *args: str, env: dict[str, str]
) -> None:
    # The bench starts its own broker and daemons; a fetched production model must not be used.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "daemon", "bench", benchmark, "--reps", "1", "--tokens", "8"),
            *("--model", str(model_path), "--out", str(tmp_path), *args),
        ],
        cwd=REPO,
        env={**_without_openmp(os.environ), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _without_openmp(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(("OMP_", "GOMP_"))}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.slow
def test_chunking_counts_messages_and_keeps_the_text(tmp_path: Path, model_path: Path) -> None:
    _bench(tmp_path, model_path, "chunking", "--flush-ms", "0,200", env={})
    result = _load(tmp_path / "bench-chunking.json")

    assert result["flushes_ms"] == [0.0, 200.0]
    assert set(result["summary"]) == {"0", "200"}
    by_flush = {sample["flush_ms"]: sample for sample in result["samples"]}
    assert set(by_flush) == {0.0, 200.0}
    for sample in by_flush.values():
        assert sample["text_matches"]
        assert sample["completion_tokens"] == 8
        assert sample["all_messages"] == sample["chunk_messages"] + 1  # the chunks and the done
        # ChunkBuffer sends only non-empty token texts, so never more chunks than tokens.
        assert 1 <= sample["chunk_messages"] <= 8
        assert sample["tokens_per_chunk"] >= 1
        assert sample["first_chunk_ms"] > 0
        assert sample["end_to_end_tokens_per_s"] > 0
    # The same answer (temperature 0), gathered for 200 ms, cannot take more chunks than per token.
    assert by_flush[200.0]["chunk_messages"] <= by_flush[0.0]["chunk_messages"]
    assert all(row["text_mismatches"] == 0 for row in result["summary"].values())


@pytest.mark.slow
def test_contention_measures_every_cell(tmp_path: Path, model_path: Path) -> None:
    # Settings in the caller's shell must not reach the "default" variant.
    caller = {"GOMP_SPINCOUNT": "12345", "OMP_WAIT_POLICY": "ACTIVE"}
    _bench(tmp_path, model_path, "contention", "--hogs", "1", env=caller)
    result = _load(tmp_path / "bench-contention.json")

    assert result["hogs"] == 1
    assert result["threads"] == os.cpu_count()
    cells = sorted((s["variant"], s["load"]) for s in result["samples"])
    assert cells == [
        ("default", "loaded"),
        ("default", "quiet"),
        ("passive", "loaded"),
        ("passive", "quiet"),
    ]
    assert all(s["decode_tokens_per_s"] > 0 for s in result["samples"])
    assert result["daemon_openmp"]["default"]["env"] == {}
    assert result["daemon_openmp"]["passive"]["env"] == {
        "GOMP_SPINCOUNT": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    for variant in ("default", "passive"):
        row = result["summary"][variant]
        assert row["quiet_tokens_per_s_median"] > 0
        assert row["loaded_tokens_per_s_median"] > 0
        assert row["loaded_over_quiet"] > 0
    assert result["variants"] == ["default", "passive"]
    assert result["cpu_quota"] is None
    assert result["summary"]["default"]["over_default_loaded"] == 1.0
    assert result["summary"]["passive"]["over_default_quiet_median_of_pairs"] > 0
    assert all(s["throttled_share"] is None for s in result["samples"])


def _cgroup_writable() -> str | None:
    """Why no quota cgroup can be made here, or None when one can."""
    try:
        with quota_groups(100, ["probe"]):
            return None
    except CgroupError as error:
        return str(error)


@pytest.mark.slow
def test_contention_runs_each_daemon_under_its_own_cpu_quota(
    tmp_path: Path, model_path: Path
) -> None:
    reason = _cgroup_writable()
    if reason:
        pytest.skip(reason)
    _bench(
        tmp_path,
        model_path,
        "contention",
        *("--hogs", "1", "--threads", "1"),
        *("--cpu-quota", "150", "--omp-variants", "default,spin-10k"),
        env={},
    )
    result = _load(tmp_path / "bench-contention.json")

    quota = result["cpu_quota"]
    assert quota["percent"] == 150
    assert (quota["period_us"], quota["quota_us"]) == (100_000, 150_000)
    expected = (
        {"cpu.max": "150000 100000"}
        if quota["kind"] == "v2"
        else {"cpu.cfs_quota_us": "150000", "cpu.cfs_period_us": "100000"}
    )
    groups = quota["groups"]
    assert set(groups) == {"default", "spin-10k"}
    assert groups["default"]["path"] != groups["spin-10k"]["path"]
    for group in groups.values():
        # Read back from /proc/PID/cgroup and the quota files after each question.
        assert group["at_measure"]["pid_cgroups"] == [group["cgroup"]]
        assert group["at_measure"]["quota_files"] == [expected]
        assert group["at_measure"]["threads_max"] >= 2
        assert Path(group["path"]).name in group["cgroup"]
        assert not Path(group["path"]).exists()
        assert not Path(group["path"]).parent.exists()
    assert result["daemon_openmp"]["spin-10k"]["env"] == {"GOMP_SPINCOUNT": "10000"}
    assert all(0 <= s["throttled_share"] <= 1 for s in result["samples"])


def test_a_quota_cgroup_goes_even_with_a_process_inside_and_an_error() -> None:
    reason = _cgroup_writable()
    if reason:
        pytest.skip(reason)
    made: list[Path] = []

    def bench(pid: int) -> None:
        with quota_groups(50, ["a", "b"]) as groups:
            made.extend(group.path for group in groups.values())
            groups["a"].add(pid)
            assert groups["a"].check(pid).pid_cgroup == groups["a"].cgroup
            raise RuntimeError("the bench failed")

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            with pytest.raises(RuntimeError):
                bench(sleeper.pid)
            assert sleeper.poll() is None  # moved out, not killed
        finally:
            sleeper.kill()
    assert len(made) == 2
    assert not any(path.exists() or path.parent.exists() for path in made)


def test_quota_without_a_writable_cgroup_says_so(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anyway; /proc takes no directories
        read_only = Path("/proc")
    with (
        pytest.raises(CgroupError, match="cannot create a cgroup under"),
        quota_groups(150, ["default"], CgroupMount("v1", read_only, "/")),
    ):
        pass


def test_cpu_cgroup_mount_prefers_a_cgroup2_with_the_cpu_controller(tmp_path: Path) -> None:
    hybrid = tmp_path / "unified"
    pure = tmp_path / "pure"
    for mount, controllers in ((hybrid, "hugetlb"), (pure, "cpuset cpu io memory pids")):
        mount.mkdir()
        (mount / "cgroup.controllers").write_text(controllers + "\n")
    v1 = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    unified = f"41 31 0:38 / {hybrid} rw,relatime - cgroup2 cgroup2 rw\n"
    assert cpu_cgroup_mount(v1 + unified) == CgroupMount(
        "v1", Path("/sys/fs/cgroup/cpu,cpuacct"), "/"
    )
    v2 = f"30 1 0:26 / {pure} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert cpu_cgroup_mount(v1 + unified + v2) == CgroupMount("v2", pure, "/")
    with pytest.raises(CgroupError, match="no cgroup2 mount offers the cpu controller"):
        cpu_cgroup_mount(unified)


def test_variants_summary_and_table() -> None:
    assert parse_variants("default, spin-100k") == ["default", "spin-100k"]
    for bad in ("default,spin-1", "", "passive,passive"):
        with pytest.raises(ValueError, match="--omp-variants"):
            parse_variants(bad)
    rates = {
        ("default", "quiet"): [40.0, 42.0],
        ("default", "loaded"): [10.0, 12.0],
        ("passive", "quiet"): [30.0, 30.0],
        ("passive", "loaded"): [20.0, 24.0],
    }
    samples = [
        ContentionSample(rep, variant, load, rate, 100.0, 0.5, 10.0)
        for (variant, load), values in rates.items()
        for rep, rate in enumerate(values)
    ]
    summary = contention_summary(samples, ["default", "passive"])
    passive = jsonable(summary["passive"])
    assert passive["quiet_tokens_per_s_median"] == 30.0
    assert passive["loaded_over_quiet"] == 0.733
    assert passive["over_default_quiet"] == round(30 / 41, 3)
    assert passive["over_default_loaded"] == 2.0
    assert passive["over_default_loaded_median_of_pairs"] == 2.0
    assert passive["loaded_throttled_share_median"] == 0.5
    assert "over_default_quiet" not in jsonable(contention_summary(samples, ["passive"])["passive"])
    table = report.contention(
        ContentionResult(
            run=Run("kioskd bench contention", "model.gguf", 2, 2, Machine(2, "0.3")),
            hogs=1,
            tokens=64,
            variants=["default", "passive"],
            variant_env={},
            caller_openmp_env={},
            daemon_openmp={},
            cpu_quota=CpuQuota(150.0, 100_000, 150_000, "v1", "/sys/fs/cgroup/cpu"),
            summary=summary,
            samples=samples,
        )
    )
    assert "CPU quota 150% per daemon (cgroup v1)" in table
    assert "passive     30.0   22.0" in table
    assert "2.00 (2.00)" in table


def test_cpu_hogs_are_killed_when_the_measurement_fails() -> None:
    started: list[subprocess.Popen[bytes]] = []

    def measure() -> None:
        with cpu_hogs(2) as hogs:
            started.extend(hogs)
            assert all(hog.poll() is None for hog in hogs)
            raise RuntimeError("the question failed")

    with pytest.raises(RuntimeError):
        measure()
    assert len(started) == 2
    assert all(hog.returncode is not None for hog in started)
