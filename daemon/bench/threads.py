"""`kioskd bench threads`: llama.cpp's own prefill and decode speed at 1.N threads, and the
thread counts to configure (model.threads, model.threads_batch)."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import psutil

from daemon.bench.harness import bench_engine, progress, raw_llama
from daemon.bench.prompt_reuse import LONG_SYSTEM_PROMPT, QUESTIONS


@dataclass(frozen=True)
class ThreadsResult:
    """The speeds at every thread count, and the fewest threads within 5 % of the best."""

    cpu_count: int | None
    physical_cores: int | None
    prompt_tokens: int
    rows: list[ThreadsRow]
    recommended: dict[str, int]  # config key -> value


@dataclass(frozen=True)
class ThreadsRow:
    threads: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def _row(llama: llama_cpp.Llama, prompt: list[int], threads: int, reps: int) -> ThreadsRow:
    llama_cpp.llama_set_n_threads(llama.ctx, threads, threads)
    prefill: list[float] = []
    decode: list[float] = []
    for _ in range(reps):
        llama.reset()  # type: ignore[no-untyped-call]
        started = time.monotonic()
        llama.eval(prompt)
        prefill.append(len(prompt) / (time.monotonic() - started))
        count, first = 0, 0.0
        for _token in llama.generate(prompt, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.monotonic()
            if count >= 64:
                break
        decode.append((count - 1) / (time.monotonic() - first))
    return ThreadsRow(
        threads, round(statistics.median(prefill), 1), round(statistics.median(decode), 1)
    )


def _fewest_within_5_percent(rows: list[ThreadsRow], speed: str) -> int:
    """The fewest threads within 5 % of the best: more threads only add heat and contention."""
    best = max(float(getattr(row, speed)) for row in rows)
    return min(row.threads for row in rows if float(getattr(row, speed)) >= 0.95 * best)


def run_threads(*, reps: int, model: Path, max_threads: int | None) -> ThreadsResult:
    """Every thread count from 1 to max_threads (all CPUs)."""
    top = max_threads or os.cpu_count() or 1
    engine = bench_engine(model, top, max_tokens=8, system_prompt=LONG_SYSTEM_PROMPT)
    prompt = engine.prompt_tokens(QUESTIONS[0])
    llama = raw_llama(engine.settings)  # llama.cpp's own speed, without kioskd around it
    engine.close()
    rows = []
    for threads in range(1, top + 1):
        row = _row(llama, prompt, threads, reps)
        rows.append(row)
        progress(
            f"{threads} threads: prefill {row.prefill_tokens_per_s} tok/s, decode "
            f"{row.decode_tokens_per_s} tok/s"
        )
    llama.close()
    return ThreadsResult(
        cpu_count=os.cpu_count(),
        physical_cores=psutil.cpu_count(logical=False),
        prompt_tokens=len(prompt),
        rows=rows,
        recommended={
            "model.threads": _fewest_within_5_percent(rows, "decode_tokens_per_s"),
            "model.threads_batch": _fewest_within_5_percent(rows, "prefill_tokens_per_s"),
        },
    )
