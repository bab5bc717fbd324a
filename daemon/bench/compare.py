"""`kioskd bench compare` (and `server`): kioskd over MQTT against the raw llama-cpp-python loop.

Both run the same model file, prompt and thread count, interleaved in one run so that machine
noise hits both alike; `server` adds llama_cpp.server behind a minimal MQTT bridge (server.py).
The daemon runs as a subprocess against a private mosquitto; the raw loop runs in this process.
Then kioskd's RSS (also after the longest question), and its idle CPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import psutil

from daemon.bench.harness import (
    KIOSKD_PREFIX,
    QUESTION,
    DaemonSpec,
    Sample,
    ask_streamed,
    bench_engine,
    interleave,
    mqtt_sample,
    private_daemons,
    raw_llama,
    resolve_model,
    resolve_threads,
)
from daemon.bench.results import FLATTEN, Run, this_run
from daemon.bench.stats import gap_p99_ms, median_or_none, percentile
from daemon.config import LimitsConfig
from daemon.engine import Engine


@dataclass(frozen=True)
class ServerRow:
    """llama_cpp.server + bridge at one answer length, beside kioskd's and the raw loop's."""

    server_decode_tokens_per_s: float
    ratio_server_over_raw: float
    ratio_kioskd_over_server: float
    ratio_kioskd_over_server_median_of_pairs: float
    server_first_chunk_ms: float
    first_chunk_ms_kioskd_minus_server_median_of_pairs: float
    ratio_first_chunk_kioskd_over_raw: float
    ratio_first_chunk_server_over_raw: float
    server_gap_p99_ms: float | None


@dataclass(frozen=True)
class CompareRow:
    """Medians at one answer length; ratios also as the median of the raw/kioskd pairs."""

    raw_decode_tokens_per_s: float
    kioskd_decode_tokens_per_s: float
    ratio_kioskd_over_raw: float
    ratio_median_of_pairs: float
    raw_first_token_ms: float
    kioskd_first_chunk_ms: float
    kioskd_model_first_token_ms: float
    first_chunk_overhead_ms_median: float
    first_chunk_overhead_ms_max: float
    first_chunk_overhead_ms_p99: float
    raw_gap_p99_ms: float | None
    kioskd_gap_p99_ms: float | None
    server: ServerRow | None = field(default=None, metadata=FLATTEN)  # `server` only


@dataclass(frozen=True)
class PooledFirstChunk:
    """Time to first chunk over every answer length (`server` only)."""

    samples_per_system: int
    raw_ms_median: float
    kioskd_ms_median: float
    server_ms_median: float
    kioskd_minus_server_ms_median_of_pairs: float
    kioskd_sooner_in_pairs: int


@dataclass(frozen=True)
class CompareResult:
    run: Run = field(metadata=FLATTEN)
    kioskd_rss_mib: float
    kioskd_rss_after_longest_question_mib: float
    rss_budget_mib: float | None
    raw_process_rss_mib: float  # also holds the MQTT client and bridge: an upper bound
    server_rss_mib: float | None
    kioskd_idle_cpu_percent_of_one_core: float | None
    server_idle_cpu_percent_of_one_core: float | None
    idle_s: float
    summary: dict[str, CompareRow]  # by answer length
    first_chunk_all_lengths: PooledFirstChunk | None
    samples: list[Sample]


def raw_sample(llama: llama_cpp.Llama, prompt: list[int], tokens: int) -> Sample:
    """The plain llama-cpp-python loop: generate, detokenize each token, nothing else."""
    pieces: list[bytes] = []
    started = time.monotonic()
    arrivals: list[float] = []
    for token in llama.generate(prompt, temp=0.0, reset=True):
        pieces.append(llama.detokenize([token]))
        arrivals.append(time.monotonic())
        if len(arrivals) >= tokens:
            break
    if not arrivals:
        raise RuntimeError("the raw loop produced no token")
    count, first = len(arrivals), arrivals[0]
    first_ms = (first - started) * 1000
    decode = (count - 1) / (arrivals[-1] - first)
    return Sample("raw", count, decode, first_ms, first_ms, None, gap_p99_ms(arrivals))


def _idle_cpu_percent(processes: list[psutil.Process], idle_s: float) -> list[float | None]:
    """CPU each idle process uses (all its threads) over the same idle_s, in % of one core."""
    if idle_s <= 0:
        return [None for _ in processes]
    before = [p.cpu_times() for p in processes]
    time.sleep(idle_s)
    after = [p.cpu_times() for p in processes]
    return [
        round(100 * ((a.user - b.user) + (a.system - b.system)) / idle_s, 3)
        for b, a in zip(before, after, strict=True)
    ]


def _rss_mib(process: psutil.Process) -> float:
    return round(process.memory_info().rss / 2**20, 1)


def _rss_after_longest_question_mib(port: int, pid: int) -> float:
    """kioskd's RSS once it has read the longest question the default limits accept: a long
    prompt touches more of llama.cpp's scratch memory than the timed questions do."""
    limit = LimitsConfig().max_question_chars
    ask_streamed(port, 1, KIOSKD_PREFIX, ((QUESTION + " ") * (limit // len(QUESTION) + 1))[:limit])
    return _rss_mib(psutil.Process(pid))


def _rss_budget_mib(engine: Engine, model: Path) -> float | None:
    """Model file + KV cache + 100 MB (10^8 bytes): what kioskd's RSS should stay under."""
    kv_bytes = engine.kv_cache_bytes()
    if kv_bytes is None:
        return None
    return round((model.stat().st_size + kv_bytes + 100_000_000) / 2**20, 1)


def _medians(samples: list[Sample], key: str, digits: int) -> float:
    return round(statistics.median(float(getattr(s, key)) for s in samples), digits)


def _server_row(raw: list[Sample], daemon: list[Sample], server: list[Sample]) -> ServerRow:
    raw_tps, daemon_tps, server_tps = (
        statistics.median(s.decode_tokens_per_s for s in samples)
        for samples in (raw, daemon, server)
    )
    raw_first, daemon_first, server_first = (
        statistics.median(s.first_token_ms for s in samples) for samples in (raw, daemon, server)
    )
    # kioskd and the server run back to back in every repetition: pair them too.
    pairs = list(zip(daemon, server, strict=True))
    return ServerRow(
        server_decode_tokens_per_s=round(server_tps, 2),
        ratio_server_over_raw=round(server_tps / raw_tps, 4),
        ratio_kioskd_over_server=round(daemon_tps / server_tps, 4),
        ratio_kioskd_over_server_median_of_pairs=round(
            statistics.median(k.decode_tokens_per_s / c.decode_tokens_per_s for k, c in pairs), 4
        ),
        server_first_chunk_ms=round(server_first, 1),
        first_chunk_ms_kioskd_minus_server_median_of_pairs=round(
            statistics.median(k.first_token_ms - c.first_token_ms for k, c in pairs), 1
        ),
        ratio_first_chunk_kioskd_over_raw=round(daemon_first / raw_first, 4),
        ratio_first_chunk_server_over_raw=round(server_first / raw_first, 4),
        server_gap_p99_ms=median_or_none([s.gap_p99_ms for s in server]),
    )


def summarize(samples: list[Sample], lengths: list[int]) -> dict[str, CompareRow]:
    summary: dict[str, CompareRow] = {}
    for length in lengths:
        raw, daemon, server = (
            [s for s in samples if s.system == system and s.tokens == length]
            for system in ("raw", "kioskd", "server")
        )
        raw_tps = statistics.median(s.decode_tokens_per_s for s in raw)
        daemon_tps = statistics.median(s.decode_tokens_per_s for s in daemon)
        overheads = [s.first_chunk_overhead_ms or 0.0 for s in daemon]
        # Samples alternate raw/kioskd, so pairing them cancels slow drifts of the machine.
        paired = [
            k.decode_tokens_per_s / r.decode_tokens_per_s for r, k in zip(raw, daemon, strict=True)
        ]
        summary[str(length)] = CompareRow(
            raw_decode_tokens_per_s=round(raw_tps, 2),
            kioskd_decode_tokens_per_s=round(daemon_tps, 2),
            ratio_kioskd_over_raw=round(daemon_tps / raw_tps, 4),
            ratio_median_of_pairs=round(statistics.median(paired), 4),
            raw_first_token_ms=_medians(raw, "first_token_ms", 1),
            kioskd_first_chunk_ms=_medians(daemon, "first_token_ms", 1),
            kioskd_model_first_token_ms=_medians(daemon, "model_first_token_ms", 1),
            first_chunk_overhead_ms_median=round(statistics.median(overheads), 2),
            first_chunk_overhead_ms_max=round(max(overheads), 2),
            first_chunk_overhead_ms_p99=round(percentile(overheads, 0.99), 2),
            raw_gap_p99_ms=median_or_none([s.gap_p99_ms for s in raw]),
            kioskd_gap_p99_ms=median_or_none([s.gap_p99_ms for s in daemon]),
            server=_server_row(raw, daemon, server) if server else None,
        )
    return summary


def first_chunk_pooled(samples: list[Sample]) -> PooledFirstChunk | None:
    """Time to first chunk over every answer length: it does not depend on the length asked,
    and the model's one-token wait varies by +-30 % from answer to answer, so twice the samples
    halve the noise of the comparison."""
    by_system = {
        system: [s for s in samples if s.system == system] for system in ("raw", "kioskd", "server")
    }
    if not by_system["server"]:
        return None
    firsts = {system: _medians(got, "first_token_ms", 1) for system, got in by_system.items()}
    pairs = [
        k.first_token_ms - c.first_token_ms
        for k, c in zip(by_system["kioskd"], by_system["server"], strict=True)
    ]
    return PooledFirstChunk(
        samples_per_system=len(pairs),
        raw_ms_median=firsts["raw"],
        kioskd_ms_median=firsts["kioskd"],
        server_ms_median=firsts["server"],
        kioskd_minus_server_ms_median_of_pairs=round(statistics.median(pairs), 1),
        kioskd_sooner_in_pairs=sum(diff < 0 for diff in pairs),
    )


def run_compare(
    *,
    reps: int,
    lengths: list[int],
    threads: int | None,
    model: str | None,
    idle_s: float = 60.0,
    vs_server: bool = False,
) -> CompareResult:
    """Interleaved raw/kioskd(/server) answers of each length."""
    resolved = resolve_model(model)
    thread_count = resolve_threads(threads)
    # The engine renders and tokenizes the prompt for the raw loop and the bridge, so that all
    # three sides read the same tokens; the raw loop runs on llama-cpp-python's own Llama.
    engine = bench_engine(resolved, thread_count, max_tokens=max(lengths))
    prompt = engine.prompt_tokens(QUESTION)
    raw = raw_llama(engine.settings)
    with (
        private_daemons(
            [DaemonSpec()], model=resolved, threads=thread_count, max_tokens=max(lengths)
        ) as run,
        contextlib.ExitStack() as extra,
    ):
        port = run.port
        daemon = psutil.Process(run.processes[KIOSKD_PREFIX].pid)
        systems: dict[str, Callable[[int], Sample]] = {
            "raw": lambda length: raw_sample(raw, prompt, length),
            "kioskd": lambda length: mqtt_sample(port, length),
        }
        processes = [daemon]
        if vs_server:
            from daemon.bench.server import BRIDGE_PREFIX, Bridge, llama_server  # noqa: PLC0415

            server_port, server_pid = extra.enter_context(
                llama_server(run.workdir, resolved, thread_count)
            )
            processes.append(psutil.Process(server_pid))
            extra.enter_context(Bridge(mqtt_port=port, server_port=server_port, engine=engine))
            systems["server"] = lambda length: mqtt_sample(port, length, BRIDGE_PREFIX, "server")
        for measure in systems.values():
            measure(8)  # warm every side before measuring
        measured = interleave(
            [(length, system) for length in lengths for system in systems],
            reps,
            lambda cell, _rep: systems[cell[1]](cell[0]),
            lambda cell, sample: (
                f"{cell[1]:6} {cell[0]:4} tokens: {sample.decode_tokens_per_s:6.1f} tok/s, "
                f"first {sample.first_token_ms:6.1f} ms"
            ),
        )
        rss_mib = [_rss_mib(p) for p in processes]
        longest_rss_mib = _rss_after_longest_question_mib(port, daemon.pid)
        raw_rss_mib = _rss_mib(psutil.Process())
        idle_percent = _idle_cpu_percent(processes, idle_s)
    rss_budget_mib = _rss_budget_mib(engine, resolved)
    engine.close()
    raw.close()
    samples = [sample for _cell, sample in measured]
    return CompareResult(
        run=this_run(resolved, thread_count, reps),
        kioskd_rss_mib=rss_mib[0],
        kioskd_rss_after_longest_question_mib=longest_rss_mib,
        rss_budget_mib=rss_budget_mib,
        raw_process_rss_mib=raw_rss_mib,
        server_rss_mib=rss_mib[1] if vs_server else None,
        kioskd_idle_cpu_percent_of_one_core=idle_percent[0],
        server_idle_cpu_percent_of_one_core=idle_percent[1] if vs_server else None,
        idle_s=idle_s,
        summary=summarize(samples, lengths),
        first_chunk_all_lengths=first_chunk_pooled(samples),
        samples=samples,
    )
