"""`kioskd bench --contention`: decode beside other CPU load, per OpenMP setting.

Daemons identical except for their OpenMP environment (and, with --cpu-quota, each in its own
cgroup) are asked in turn, quiet and beside busy processes, rotating the order every
repetition so that this machine's drift hits every cell alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from daemon.bench.cgroup import CFS_PERIOD_US, QuotaGroup, cpu_cgroup_mount, quota_groups
from daemon.bench.compare import (
    _daemon,
    _mqtt_sample,
    command_line,
    machine,
    median_or_none,
    rotated,
    write_result,
)
from daemon.bench.localbroker import LocalBroker, free_port
from daemon.models import resolve

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
class _Target:
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


def _openmp_of(pid: int) -> dict[str, Any]:
    """The OpenMP runtime a daemon has mapped and the OpenMP variables it really got.

    The settings act only on an OpenMP runtime (this llama-cpp-python build links libgomp), and
    reading them back from the process shows the "default" variant ran without them.
    """
    process = psutil.Process(pid)
    runtime = None
    for region in process.memory_maps(grouped=True):
        name = Path(region.path).name
        if name.startswith(("libgomp", "libomp", "libiomp")):
            runtime = name
    return {"runtime": runtime, "env": _openmp_env(process.environ())}


def _openmp_env(environ: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in environ.items() if key.startswith(("OMP_", "GOMP_"))}


def _contention_sample(
    port: int, tokens: int, target: _Target, *, load: str, hogs: int, rep: int
) -> tuple[ContentionSample, dict[str, Any] | None]:
    """One question; with a quota group, also how throttled the daemon got and where it was."""
    group = target.group
    with cpu_hogs(hogs if load == "loaded" else 0):
        before = group.throttling() if group else None
        sample = _mqtt_sample(port, tokens, _variant_prefix(target.variant), target.variant)
        after = group.throttling() if group else None
        # Still at the measurement, hogs running: every thread inside, the quota unchanged.
        check = group.check(target.pid) if group else None
    share = throttled_ms = None
    if before and after:
        periods = after[0] - before[0]
        share = round((after[1] - before[1]) / periods, 3) if periods else 0.0
        throttled_ms = round(after[2] - before[2], 1)
    result = ContentionSample(
        rep,
        target.variant,
        load,
        sample.decode_tokens_per_s,
        round(sample.first_token_ms, 1),
        share,
        throttled_ms,
    )
    return result, check


def _note_check(seen: dict[str, dict[str, Any]], variant: str, check: dict[str, Any]) -> None:
    """Gather what the checks at measure time found, every distinct value once."""
    entry = seen.setdefault(variant, {"pid_cgroups": [], "quota_files": [], "threads_max": 0})
    for key, value in (("pid_cgroups", check["pid_cgroup"]), ("quota_files", check["quota_files"])):
        if value not in entry[key]:
            entry[key].append(value)
    entry["threads_max"] = max(entry["threads_max"], check["threads"])


def _variant_prefix(variant: str) -> str:
    return f"bench/openmp-{variant}"


def _ratio(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Ratio of the medians, and the median of the per-repetition ratios (cancels drift)."""
    pairs = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return {
        "ratio_of_medians": round(
            statistics.median(numerators) / statistics.median(denominators), 3
        ),
        "ratio_median_of_pairs": round(statistics.median(pairs), 3),
    }


def contention_summary(samples: list[ContentionSample], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant: medians quiet and loaded, the loss under load, and the ratio to "default".

    The ratios to "default" are there only when "default" was measured.
    """

    def of(variant: str, load: str) -> list[ContentionSample]:
        # Samples are in repetition order, so the lists pair up by repetition.
        return [s for s in samples if (s.variant, s.load) == (variant, load)]

    def rates(variant: str, load: str) -> list[float]:
        return [s.decode_tokens_per_s for s in of(variant, load)]

    summary: dict[str, Any] = {}
    for variant in variants:
        quiet, loaded = rates(variant, "quiet"), rates(variant, "loaded")
        loss = _ratio(loaded, quiet)
        row: dict[str, Any] = {
            "quiet_tokens_per_s_median": round(statistics.median(quiet), 2),
            "loaded_tokens_per_s_median": round(statistics.median(loaded), 2),
            "loaded_over_quiet": loss["ratio_of_medians"],
            "loaded_over_quiet_median_of_pairs": loss["ratio_median_of_pairs"],
        }
        if "default" in variants:
            for load in LOADS:
                ratio = _ratio(rates(variant, load), rates("default", load))
                row[f"over_default_{load}"] = ratio["ratio_of_medians"]
                row[f"over_default_{load}_median_of_pairs"] = ratio["ratio_median_of_pairs"]
        for load in LOADS:
            shares = [s.throttled_share for s in of(variant, load)]
            row[f"{load}_throttled_share_median"] = median_or_none(shares)
        summary[variant] = row
    return summary


def run_contention_bench(
    *,
    reps: int,
    tokens: int,
    threads: int | None,
    hogs: int,
    model: str | None,
    out_dir: Path,
    variants: Sequence[str] = ("default", "passive"),
    cpu_quota: float | None = None,
) -> dict[str, Any]:
    """Decode speed with and without `hogs` busy processes, for each OpenMP variant.

    cpu_quota: percent of one CPU; each daemon then runs in its own fresh cgroup with that CPU
    bandwidth limit (as systemd's CPUQuota= does), the hogs outside them.
    """
    unknown = [variant for variant in variants if variant not in OPENMP_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown OpenMP variant(s) {unknown}; known: {list(OPENMP_VARIANTS)}")
    # The collapse needs the model's threads to want every core while something else wants one.
    thread_count = threads or os.cpu_count() or 1
    cells = [(variant, load) for variant in variants for load in LOADS]
    samples: list[ContentionSample] = []
    openmp: dict[str, dict[str, Any]] = {}
    seen: dict[str, dict[str, Any]] = {}
    quota: dict[str, Any] | None = None
    with (
        tempfile.TemporaryDirectory(prefix="kioskd-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        groups: dict[str, QuotaGroup] = {}
        if cpu_quota is not None:
            # Entered first, so it is left last: after the daemons in it have stopped; and
            # before anything slow, so that a machine without a writable cgroup says so at once.
            mount = cpu_cgroup_mount()
            groups = stack.enter_context(quota_groups(cpu_quota, variants, mount))
            quota = {
                "percent": cpu_quota,
                "period_us": CFS_PERIOD_US,
                "quota_us": next(iter(groups.values())).quota_us,
                "kind": mount.kind,
                "mount": str(mount.mountpoint),
                "groups": {},
            }
        resolved = resolve(model).path
        workdir = Path(tmp)
        broker = stack.enter_context(LocalBroker(free_port(), workdir))
        targets: dict[str, _Target] = {}
        for variant in variants:
            daemon = stack.enter_context(
                _daemon(
                    workdir,
                    broker.port,
                    resolved,
                    thread_count,
                    tokens,
                    prefix=_variant_prefix(variant),
                    env=OPENMP_VARIANTS[variant],
                )
            )
            openmp[variant] = _openmp_of(daemon.pid)
            group = groups.get(variant)
            if group and quota is not None:
                group.add(daemon.pid)
                quota["groups"][variant] = {
                    "path": str(group.path),
                    "cgroup": group.cgroup,
                    "pid": daemon.pid,
                    "quota_files": group.quota_files(),
                }
            targets[variant] = _Target(variant, daemon.pid, group)
        for rep in range(reps):
            for variant, load in rotated(cells, rep):
                sample, check = _contention_sample(
                    broker.port, tokens, targets[variant], load=load, hogs=hogs, rep=rep
                )
                samples.append(sample)
                if check:
                    _note_check(seen, variant, check)
                throttled = (
                    f", throttled {sample.throttled_share:5.1%} of periods"
                    if sample.throttled_share is not None
                    else ""
                )
                print(
                    f"rep {rep + 1}/{reps} {variant:9} {load:6} "
                    f"{sample.decode_tokens_per_s:6.1f} tok/s, "
                    f"first {sample.first_chunk_ms:6.1f} ms{throttled}",
                    file=sys.stderr,
                    flush=True,
                )
    if quota is not None:
        for variant, found in seen.items():
            # Read back from /proc/PID/task/*/cgroup and the quota files after every question.
            quota["groups"][variant]["at_measure"] = found
    result = {
        "command": command_line(),
        "model": str(resolved),
        "threads": thread_count,
        "hogs": hogs,
        "tokens": tokens,
        "reps": reps,
        "machine": machine(),
        "variants": list(variants),
        "variant_env": {variant: OPENMP_VARIANTS[variant] for variant in variants},  # null: unset
        "caller_openmp_env": _openmp_env(dict(os.environ)),
        # What each daemon really ran with; other OpenMP settings of the caller reach them all.
        "daemon_openmp": openmp,
        "cpu_quota": quota,  # null: no quota, the daemons in the caller's cgroup
        "summary": contention_summary(samples, variants),
        "samples": [asdict(s) for s in samples],
    }
    write_result(result, out_dir, "bench-contention.json")
    return result


def render_contention(result: dict[str, Any]) -> str:
    """The contention summary as a short table: medians, and in brackets medians of pairs."""
    summary = result["summary"]
    quota = result.get("cpu_quota")
    limit = (
        f", CPU quota {quota['percent']:g}% per daemon (cgroup {quota['kind']})"
        if quota
        else ", no CPU quota"
    )
    lines = [
        f"{result['tokens']} tokens, {result['threads']} model threads, {result['hogs']} hog(s), "
        f"{result['reps']} reps{limit}",
        f"{'variant':<9} {'quiet':>6} {'loaded':>6} {'loaded/quiet':>15} "
        f"{'quiet/default':>15} {'loaded/default':>15}" + ("  throttled q/l" if quota else ""),
    ]
    for variant in result["variants"]:
        row = summary[variant]
        line = (
            f"{variant:<9} {row['quiet_tokens_per_s_median']:>6.1f} "
            f"{row['loaded_tokens_per_s_median']:>6.1f} "
            f"{_paired(row, 'loaded_over_quiet', 'loaded_over_quiet_median_of_pairs'):>15} "
            f"{_paired(row, 'over_default_quiet', 'over_default_quiet_median_of_pairs'):>15} "
            f"{_paired(row, 'over_default_loaded', 'over_default_loaded_median_of_pairs'):>15}"
        )
        if quota:
            line += (
                f"  {_percent(row['quiet_throttled_share_median'])}/"
                f"{_percent(row['loaded_throttled_share_median'])}"
            )
        lines.append(line)
    lines.append("tok/s: decode medians; ratios: of medians (median of per-rep pairs)")
    if quota:
        lines.append("throttled: median share of 100 ms periods the daemon ran out of quota")
    return "\n".join(lines)


def _paired(row: dict[str, Any], key: str, pairs_key: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.2f} ({row[pairs_key]:.2f})"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"
