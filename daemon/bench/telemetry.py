"""`kioskd bench telemetry`: decode speed with P/health every 1 s against telemetry effectively
off (once a day), two daemons on one private broker asked in turn."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from daemon.bench import harness
from daemon.bench.harness import DaemonSpec
from daemon.bench.results import FLATTEN, Run, this_run

FAST, OFF = "bench/telemetry-1s", "bench/telemetry-off"


@dataclass(frozen=True)
class TelemetryResult:
    run: Run = field(metadata=FLATTEN)
    tokens: int
    telemetry_1s_tokens_per_s_median: float
    telemetry_off_tokens_per_s_median: float
    drop_percent_of_medians: float
    drop_percent_median_of_pairs: float
    samples: dict[str, list[float]]  # decode tok/s by the daemon's topic prefix


def run_telemetry(
    *, reps: int, tokens: int, threads: int | None, model: str | None
) -> TelemetryResult:
    """Both daemons, interleaved."""
    resolved = harness.resolve_model(model)
    thread_count = harness.resolve_threads(threads)
    specs = [
        DaemonSpec(FAST, telemetry_interval_s=1.0),
        DaemonSpec(OFF, telemetry_interval_s=86400.0),
    ]
    with harness.private_daemons(
        specs, model=resolved, threads=thread_count, max_tokens=tokens
    ) as run:
        measured = harness.interleave(
            [FAST, OFF],
            reps,
            lambda prefix, _rep: harness.mqtt_sample(run.port, tokens, prefix).decode_tokens_per_s,
            lambda prefix, rate: f"{prefix:22} {rate:6.1f} tok/s",
        )
    rates = {prefix: [rate for cell, rate in measured if cell == prefix] for prefix in (FAST, OFF)}
    fast, off = statistics.median(rates[FAST]), statistics.median(rates[OFF])
    ratios = [a / b for a, b in zip(rates[FAST], rates[OFF], strict=True)]
    return TelemetryResult(
        run=this_run(resolved, thread_count, reps),
        tokens=tokens,
        telemetry_1s_tokens_per_s_median=round(fast, 2),
        telemetry_off_tokens_per_s_median=round(off, 2),
        drop_percent_of_medians=round(100 * (1 - fast / off), 2),
        drop_percent_median_of_pairs=round(100 * (1 - statistics.median(ratios)), 2),
        samples=rates,
    )
