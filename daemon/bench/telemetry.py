"""`kioskd bench telemetry`: decode speed with P/health every 1 s against telemetry effectively
off (once a day), two daemons on one private broker asked in turn."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from daemon.bench.harness import (
    DaemonSpec,
    command_line,
    interleave,
    mqtt_sample,
    private_daemons,
    resolve_model,
    resolve_threads,
    write_result,
)

FAST, OFF = "bench/telemetry-1s", "bench/telemetry-off"


@dataclass(frozen=True)
class TelemetryResult:
    command: str
    model: str
    threads: int
    tokens: int
    reps: int
    telemetry_1s_tokens_per_s_median: float
    telemetry_off_tokens_per_s_median: float
    drop_percent_of_medians: float
    drop_percent_median_of_pairs: float
    samples: dict[str, list[float]]  # decode tok/s by the daemon's topic prefix


def run_telemetry(
    *, reps: int, tokens: int, threads: int | None, model: str | None, out_dir: Path
) -> TelemetryResult:
    """Both daemons, interleaved; writes bench-telemetry.json."""
    resolved = resolve_model(model)
    thread_count = resolve_threads(threads)
    specs = [
        DaemonSpec(FAST, telemetry_interval_s=1.0),
        DaemonSpec(OFF, telemetry_interval_s=86400.0),
    ]
    with private_daemons(specs, model=resolved, threads=thread_count, max_tokens=tokens) as run:
        measured = interleave(
            [FAST, OFF],
            reps,
            lambda prefix, _rep: mqtt_sample(run.port, tokens, prefix).decode_tokens_per_s,
            lambda prefix, rate: f"{prefix:22} {rate:6.1f} tok/s",
        )
    rates = {prefix: [rate for cell, rate in measured if cell == prefix] for prefix in (FAST, OFF)}
    fast, off = statistics.median(rates[FAST]), statistics.median(rates[OFF])
    ratios = [a / b for a, b in zip(rates[FAST], rates[OFF], strict=True)]
    result = TelemetryResult(
        command=command_line(),
        model=str(resolved),
        threads=thread_count,
        tokens=tokens,
        reps=reps,
        telemetry_1s_tokens_per_s_median=round(fast, 2),
        telemetry_off_tokens_per_s_median=round(off, 2),
        drop_percent_of_medians=round(100 * (1 - fast / off), 2),
        drop_percent_median_of_pairs=round(100 * (1 - statistics.median(ratios)), 2),
        samples=rates,
    )
    write_result(result, out_dir, "bench-telemetry.json")
    return result
