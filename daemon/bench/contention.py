"""`kioskd bench contention`: decode beside other CPU load, per OpenMP setting.

Daemons identical except for their OpenMP environment (and, with --cpu-quota, each in its own
cgroup: cgroup.py) are asked in turn, quiet and beside busy processes, rotating the order every
repetition so that this machine's drift hits every cell alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemon.bench.cgroup import (
    CFS_PERIOD_US,
    GroupCheck,
    QuotaGroup,
    cpu_cgroup_mount,
    quota_groups,
)
from daemon.bench.harness import DaemonSpec, interleave, mqtt_sample, private_daemons, resolve_model
from daemon.bench.results import FLATTEN, Run, this_run
from daemon.bench.stats import Ratio, median_or_none, paired_ratio

# None unsets the variable: "default" is libgomp as shipped, whatever the calling shell has set.
# "passive" is exactly what systemd/kioskd.service sets; the spin-* ones sit in between: workers
# spin that many times at a barrier before they sleep (libgomp spins 300000 times when
# GOMP_SPINCOUNT and OMP_WAIT_POLICY are both unset).
OPENMP_VARIANTS: dict[str, dict[str, str | None]] = {
    "default": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None},
    "passive": {"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None},
    "spin-100k": {"GOMP_SPINCOUNT": "100000", "OMP_WAIT_POLICY": None},
}
LOADS = ("quiet", "loaded")
# A hog needs a moment to start Python and reach its loop; the question should meet it spinning.
_HOG_SETTLE_S = 0.3


def parse_variants(text: str) -> list[str]:
    """`--omp-variants`: names of OPENMP_VARIANTS, comma-separated, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPENMP_VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"--omp-variants {text!r}: give distinct names from {', '.join(OPENMP_VARIANTS)}"
        )
    return names


@dataclass(frozen=True)
class ContentionSample:
    rep: int
    variant: str  # a key of OPENMP_VARIANTS
    load: str  # "quiet" or "loaded"
    decode_tokens_per_s: float
    first_chunk_ms: float  # as the client sees it, so prefill under the same load is in it
    # With --cpu-quota, over the question: the share of the daemon cgroup's 100 ms periods in
    # which it ran out of quota, and how long it stood throttled; None without a quota.
    throttled_share: float | None = None
    throttled_ms: float | None = None


@dataclass(frozen=True)
class OpenMP:
    """The OpenMP runtime a daemon has mapped and the OpenMP variables it really got."""

    runtime: str | None
    env: dict[str, str]


@dataclass
class AtMeasure:
    """What the checks after every question found, every distinct value once."""

    pid_cgroups: list[str] = field(default_factory=list)
    quota_files: list[dict[str, str]] = field(default_factory=list)
    threads_max: int = 0

    def note(self, check: GroupCheck) -> None:
        if check.pid_cgroup not in self.pid_cgroups:
            self.pid_cgroups.append(check.pid_cgroup)
        if check.quota_files not in self.quota_files:
            self.quota_files.append(check.quota_files)
        self.threads_max = max(self.threads_max, check.threads)


@dataclass(frozen=True)
class GroupPlace:
    path: str
    cgroup: str
    pid: int
    quota_files: dict[str, str]
    at_measure: AtMeasure = field(default_factory=AtMeasure)


@dataclass(frozen=True)
class CpuQuota:
    percent: float
    period_us: int
    quota_us: int
    kind: str  # "v2" or "v1"
    mount: str
    groups: dict[str, GroupPlace] = field(default_factory=dict)


@dataclass(frozen=True)
class ContentionRow:
    """One variant's medians, loaded over quiet, and its speed over the "default" variant's."""

    quiet_tokens_per_s_median: float
    loaded_tokens_per_s_median: float
    loss: Ratio  # loaded over quiet
    over_default: dict[str, Ratio] | None  # by load; only when "default" was measured
    throttled_share_median: dict[str, float | None]  # by load; None without a quota

    def to_json(self) -> dict[str, Any]:
        """The keys of bench-contention.json: loaded_over_quiet, over_default_quiet, ..."""
        out: dict[str, Any] = {
            "quiet_tokens_per_s_median": self.quiet_tokens_per_s_median,
            "loaded_tokens_per_s_median": self.loaded_tokens_per_s_median,
            "loaded_over_quiet": self.loss.of_medians,
            "loaded_over_quiet_median_of_pairs": self.loss.median_of_pairs,
        }
        for load, ratio in (self.over_default or {}).items():
            out[f"over_default_{load}"] = ratio.of_medians
            out[f"over_default_{load}_median_of_pairs"] = ratio.median_of_pairs
        for load, share in self.throttled_share_median.items():
            out[f"{load}_throttled_share_median"] = share
        return out


@dataclass(frozen=True)
class ContentionResult:
    run: Run = field(metadata=FLATTEN)
    hogs: int
    tokens: int
    variants: list[str]
    variant_env: dict[str, dict[str, str | None]]  # null: unset
    caller_openmp_env: dict[str, str]
    # What each daemon really ran with; other OpenMP settings of the caller reach them all.
    daemon_openmp: dict[str, OpenMP]
    cpu_quota: CpuQuota | None  # null: no quota, the daemons in the caller's cgroup
    summary: dict[str, ContentionRow]
    samples: list[ContentionSample]


@dataclass(frozen=True)
class _Daemon:
    variant: str
    pid: int
    group: QuotaGroup | None


@contextmanager
def cpu_hogs(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` busy-looping processes, killed on the way out whatever happens inside."""
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            hogs.append(
                subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL
                )
            )
        if hogs:
            time.sleep(_HOG_SETTLE_S)
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def _openmp_of(pid: int) -> OpenMP:
    """The settings act only on an OpenMP runtime (this llama-cpp-python build links libgomp),
    and reading them back from the process shows the "default" variant ran without them."""
    process = psutil.Process(pid)
    runtime = None
    for region in process.memory_maps(grouped=True):
        name = Path(region.path).name
        if name.startswith(("libgomp", "libomp", "libiomp")):
            runtime = name
    return OpenMP(runtime, _openmp_env(process.environ()))


def _openmp_env(environ: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in environ.items() if key.startswith(("OMP_", "GOMP_"))}


def _contention_sample(
    port: int, tokens: int, daemon: _Daemon, *, load: str, hogs: int, rep: int
) -> tuple[ContentionSample, GroupCheck | None]:
    """One question; with a quota group, also how throttled the daemon got and where it was."""
    variant, group = daemon.variant, daemon.group
    with cpu_hogs(hogs if load == "loaded" else 0):
        before = group.throttling() if group else None
        sample = mqtt_sample(port, tokens, _variant_prefix(variant), variant)
        after = group.throttling() if group else None
        # Still at the measurement, hogs running: every thread inside, the quota unchanged.
        check = group.check(daemon.pid) if group else None
    share = throttled_ms = None
    if before and after:
        periods = after[0] - before[0]
        share = round((after[1] - before[1]) / periods, 3) if periods else 0.0
        throttled_ms = round(after[2] - before[2], 1)
    result = ContentionSample(
        rep,
        variant,
        load,
        sample.decode_tokens_per_s,
        round(sample.first_token_ms, 1),
        share,
        throttled_ms,
    )
    return result, check


def _variant_prefix(variant: str) -> str:
    return f"bench/openmp-{variant}"


def contention_summary(
    samples: list[ContentionSample], variants: Sequence[str]
) -> dict[str, ContentionRow]:
    """Per variant: medians quiet and loaded, the loss under load, and the ratio to "default"
    (only when "default" was measured)."""

    def of(variant: str, load: str) -> list[ContentionSample]:
        # Samples are in repetition order, so the lists pair up by repetition.
        return [s for s in samples if (s.variant, s.load) == (variant, load)]

    def rates(variant: str, load: str) -> list[float]:
        return [s.decode_tokens_per_s for s in of(variant, load)]

    summary: dict[str, ContentionRow] = {}
    for variant in variants:
        over_default = None
        if "default" in variants:
            over_default = {
                load: paired_ratio(rates(variant, load), rates("default", load), 3)
                for load in LOADS
            }
        summary[variant] = ContentionRow(
            quiet_tokens_per_s_median=round(statistics.median(rates(variant, "quiet")), 2),
            loaded_tokens_per_s_median=round(statistics.median(rates(variant, "loaded")), 2),
            loss=paired_ratio(rates(variant, "loaded"), rates(variant, "quiet"), 3),
            over_default=over_default,
            throttled_share_median={
                load: median_or_none([s.throttled_share for s in of(variant, load)])
                for load in LOADS
            },
        )
    return summary


def _label(cell: tuple[str, str], sample: ContentionSample) -> str:
    throttled = (
        f", throttled {sample.throttled_share:5.1%} of periods"
        if sample.throttled_share is not None
        else ""
    )
    return (
        f"{cell[0]:9} {cell[1]:6} {sample.decode_tokens_per_s:6.1f} tok/s, "
        f"first {sample.first_chunk_ms:6.1f} ms{throttled}"
    )


def run_contention(
    *,
    reps: int,
    tokens: int,
    threads: int | None,
    hogs: int,
    model: str | None,
    variants: Sequence[str] = ("default", "passive"),
    cpu_quota: float | None = None,
) -> ContentionResult:
    """Decode speed with and without `hogs` busy processes, for each OpenMP variant.

    cpu_quota: percent of one CPU; each daemon then runs in its own fresh cgroup with that CPU
    bandwidth limit (as systemd's CPUQuota= does), the hogs outside them.
    """
    unknown = [variant for variant in variants if variant not in OPENMP_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown OpenMP variant(s) {unknown}; known: {list(OPENMP_VARIANTS)}")
    # The collapse needs the model's threads to want every core while something else wants one.
    thread_count = threads or os.cpu_count() or 1
    quota: CpuQuota | None = None
    with contextlib.ExitStack() as stack:
        groups: dict[str, QuotaGroup] = {}
        if cpu_quota is not None:
            # Entered first, so it is left last: after the daemons in it have stopped; and
            # before anything slow, so that a machine without a writable cgroup says so at once.
            mount = cpu_cgroup_mount()
            groups = stack.enter_context(quota_groups(cpu_quota, variants, mount))
            quota_us = next(iter(groups.values())).quota_us
            quota = CpuQuota(cpu_quota, CFS_PERIOD_US, quota_us, mount.kind, str(mount.mountpoint))
        resolved = resolve_model(model)
        specs = [DaemonSpec(_variant_prefix(v), env=OPENMP_VARIANTS[v]) for v in variants]
        run = stack.enter_context(
            private_daemons(specs, model=resolved, threads=thread_count, max_tokens=tokens)
        )
        daemons: dict[str, _Daemon] = {}
        for variant in variants:
            pid = run.processes[_variant_prefix(variant)].pid
            group = groups.get(variant)
            if group and quota is not None:
                group.add(pid)
                place = GroupPlace(str(group.path), group.cgroup, pid, group.quota_files())
                quota.groups[variant] = place
            daemons[variant] = _Daemon(variant, pid, group)
        openmp = {variant: _openmp_of(daemon.pid) for variant, daemon in daemons.items()}

        def measure(cell: tuple[str, str], rep: int) -> ContentionSample:
            variant, load = cell
            sample, check = _contention_sample(
                run.port, tokens, daemons[variant], load=load, hogs=hogs, rep=rep
            )
            if check and quota is not None:
                # Read back from /proc/PID/task/*/cgroup and the quota files after every question.
                quota.groups[variant].at_measure.note(check)
            return sample

        cells = [(variant, load) for variant in variants for load in LOADS]
        samples = [sample for _cell, sample in interleave(cells, reps, measure, _label)]
    return ContentionResult(
        run=this_run(resolved, thread_count, reps),
        hogs=hogs,
        tokens=tokens,
        variants=list(variants),
        variant_env={variant: OPENMP_VARIANTS[variant] for variant in variants},
        caller_openmp_env=_openmp_env(dict(os.environ)),
        daemon_openmp=openmp,
        cpu_quota=quota,
        summary=contention_summary(samples, variants),
        samples=samples,
    )
