"""`kioskd bench`: the daemon over MQTT against the raw llama-cpp-python token loop.

Both run the same model file, prompt and thread count, interleaved in one run so that
machine noise hits both alike. The daemon runs as a subprocess against a private mosquitto
on a free loopback port; the raw loop runs in this process. End-of-turn is ignored in both
(KIOSKD_TEST_IGNORE_EOS) so every answer has exactly the asked length.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import psutil
import yaml

from daemon.asker import Answer, ask
from daemon.bench.localbroker import LocalBroker, free_port
from daemon.config import LimitsConfig, default_threads
from daemon.engine import Engine, EngineSettings
from daemon.models import resolve
from daemon.testhooks import TestHooks

KIOSKD_PREFIX = "bench/kiosk"
QUESTION = "Explain briefly how a factory conveyor belt works."
Cell = TypeVar("Cell")
SYSTEM_PROMPT = "You are a helpful assistant on a factory-floor kiosk. Answer briefly and plainly."


@dataclass(frozen=True)
class Sample:
    system: str  # "raw", "kioskd" or "server" (llama_cpp.server + bridge)
    tokens: int
    decode_tokens_per_s: float
    first_token_ms: float  # raw: prompt + first token; kioskd: as seen by the client
    model_first_token_ms: float  # the model's own time to the first token
    first_chunk_overhead_ms: float | None  # kioskd only: client first chunk - model first token
    gap_p99_ms: float | None = None  # p99 time between chunks (raw: between tokens)


@contextmanager
def _daemon(
    workdir: Path,
    port: int,
    model: Path,
    threads: int,
    max_tokens: int,
    *,
    prefix: str = KIOSKD_PREFIX,
    telemetry_interval_s: float = 30.0,
    stream: dict[str, Any] | None = None,
    env: dict[str, str | None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A kioskd subprocess on the broker, answered a first question (so loaded and warm).

    stream: the config's stream section (flush_ms, max_chunk_chars); env: extra environment
    variables (OpenMP settings, say), on top of this process's; a None value removes that
    variable, so a baseline runs without settings the calling shell happens to have.
    """
    name = prefix.replace("/", "-")
    config: dict[str, Any] = {
        # Distinct client ids: two daemons sharing one would keep kicking each other off.
        "mqtt": {"port": port, "topic_prefix": prefix, "client_id": f"kioskd-{name}"},
        "telemetry": {"interval_s": telemetry_interval_s},
        "model": {
            "path": str(model),
            "threads": threads,
            "max_tokens": max_tokens,
            "system_prompt": SYSTEM_PROMPT,
            "temperature": 0.0,
        },
        "logging": {"level": "WARNING"},
    }
    if stream:
        config["stream"] = stream
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            process_env.pop(key, None)
        else:
            process_env[key] = value
    process_env["KIOSKD_TEST_IGNORE_EOS"] = "1"
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config_path)],
        env=process_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # A 1-token question answered means the model is loaded and warm.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (
                ask(
                    "ping", host="127.0.0.1", port=port, prefix=prefix, max_tokens=1, timeout_s=5
                ).final
                is not None
            ):
                break
        else:
            raise RuntimeError(f"kioskd did not answer; see {workdir / name}.log")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


def raw_llama(settings: EngineSettings) -> llama_cpp.Llama:
    """llama-cpp-python's own Llama on the engine's model and settings, for the raw loop."""
    return llama_cpp.Llama(
        model_path=str(settings.path),
        n_ctx=settings.ctx,
        n_threads=settings.threads,
        n_threads_batch=settings.threads_batch,
        n_batch=settings.batch_tokens,
        n_ubatch=settings.batch_tokens,
        use_mmap=settings.mmap,
        verbose=False,
    )


def _raw_sample(llama: llama_cpp.Llama, prompt: list[int], tokens: int) -> Sample:
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


def gap_p99_ms(arrivals: list[float]) -> float | None:
    """p99 of the times between consecutive arrivals, in ms (None with fewer than two)."""
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return round(_percentile(gaps, 0.99), 2) if gaps else None


@dataclass(frozen=True)
class Streamed:
    """One question's complete answer stream, as the client received it."""

    answer: Answer
    final: dict[str, Any]  # the done message
    chunk_arrivals: list[float]  # monotonic arrival time of each chunk
    chunk_texts: list[str]
    first_chunk_ms: float  # from publishing the question to the first chunk's arrival


def ask_streamed(port: int, tokens: int, prefix: str, question: str = QUESTION) -> Streamed:
    """Ask over MQTT at temperature 0; anything but a streamed `done` raises."""
    answer: Answer = ask(
        question,
        host="127.0.0.1",
        port=port,
        prefix=prefix,
        max_tokens=tokens,
        temperature=0.0,
        timeout_s=600,
    )
    final = answer.final
    if final is None or final.get("type") != "done" or answer.first_chunk_monotonic is None:
        raise RuntimeError(f"{prefix} did not answer properly: {final}")
    chunks = [
        (arrived, str(message["text"]))
        for arrived, message in zip(answer.arrivals_monotonic, answer.messages, strict=True)
        if message["type"] == "chunk"
    ]
    first_chunk_ms = (answer.first_chunk_monotonic - answer.sent_monotonic) * 1000
    return Streamed(answer, final, [a for a, _ in chunks], [t for _, t in chunks], first_chunk_ms)


def _mqtt_sample(
    port: int, tokens: int, prefix: str = KIOSKD_PREFIX, system: str = "kioskd"
) -> Sample:
    """Ask over MQTT (kioskd, or the bridge in front of llama_cpp.server) and time the stream."""
    streamed = ask_streamed(port, tokens, prefix)
    final, chunk_arrivals = streamed.final, streamed.chunk_arrivals
    completion = int(final["usage"]["completion_tokens"])
    # Tokens after the first, over the time between the first and the last chunk's arrival.
    decode = (completion - 1) / (chunk_arrivals[-1] - chunk_arrivals[0])
    client_first_ms = streamed.first_chunk_ms
    timing = final["timing"]
    gap_ms = gap_p99_ms(chunk_arrivals)
    if timing["first_token_ms"] is None:  # the bridge cannot see the model's own timing
        return Sample(system, tokens, decode, client_first_ms, client_first_ms, None, gap_ms)
    model_first_ms = float(timing["first_token_ms"]) - float(timing["queued_ms"])
    return Sample(
        system,
        tokens,
        decode,
        client_first_ms,
        model_first_ms,
        client_first_ms - model_first_ms,
        gap_ms,
    )


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


def _rss_after_longest_question_mib(port: int, pid: int) -> float:
    """kioskd's RSS once it has read the longest question the default limits accept: a long
    prompt touches more of llama.cpp's scratch memory than the timed questions do."""
    limit = LimitsConfig().max_question_chars
    ask_streamed(port, 1, KIOSKD_PREFIX, ((QUESTION + " ") * (limit // len(QUESTION) + 1))[:limit])
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _rss_budget_mib(engine: Engine, model: Path) -> float | None:
    """Model file + KV cache + 100 MB (10^8 bytes): what kioskd's RSS should stay under."""
    kv_bytes = engine.kv_cache_bytes()
    if kv_bytes is None:
        return None
    return round((model.stat().st_size + kv_bytes + 100_000_000) / 2**20, 1)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values that exist, rounded to 0.01; None when none does."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _median_gap(samples: list[Sample]) -> float | None:
    return median_or_none([s.gap_p99_ms for s in samples])


def rotated(cells: Sequence[Cell], rep: int) -> list[Cell]:
    """The cells in an order that starts one later every repetition, so none always goes first."""
    shift = rep % len(cells)
    return [*cells[shift:], *cells[:shift]]


def command_line() -> str:
    return "kioskd bench " + " ".join(sys.argv[2:])


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "llama_cpp_python": llama_cpp.__version__}


def write_result(result: dict[str, Any], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(result, indent=2))


def summarize(samples: list[Sample], lengths: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for length in lengths:
        raw = [s for s in samples if s.system == "raw" and s.tokens == length]
        daemon = [s for s in samples if s.system == "kioskd" and s.tokens == length]
        raw_tps = statistics.median(s.decode_tokens_per_s for s in raw)
        daemon_tps = statistics.median(s.decode_tokens_per_s for s in daemon)
        overheads = [s.first_chunk_overhead_ms or 0.0 for s in daemon]
        # Samples alternate raw/kioskd, so pairing them cancels slow drifts of the machine.
        paired = [
            k.decode_tokens_per_s / r.decode_tokens_per_s for r, k in zip(raw, daemon, strict=True)
        ]
        summary[str(length)] = {
            "raw_decode_tokens_per_s": round(raw_tps, 2),
            "kioskd_decode_tokens_per_s": round(daemon_tps, 2),
            "ratio_kioskd_over_raw": round(daemon_tps / raw_tps, 4),
            "ratio_median_of_pairs": round(statistics.median(paired), 4),
            "raw_first_token_ms": round(statistics.median(s.first_token_ms for s in raw), 1),
            "kioskd_first_chunk_ms": round(statistics.median(s.first_token_ms for s in daemon), 1),
            "kioskd_model_first_token_ms": round(
                statistics.median(s.model_first_token_ms for s in daemon), 1
            ),
            "first_chunk_overhead_ms_median": round(statistics.median(overheads), 2),
            "first_chunk_overhead_ms_max": round(max(overheads), 2),
            "first_chunk_overhead_ms_p99": round(_percentile(overheads, 0.99), 2),
            "raw_gap_p99_ms": _median_gap(raw),
            "kioskd_gap_p99_ms": _median_gap(daemon),
        }
        server = [s for s in samples if s.system == "server" and s.tokens == length]
        if server:
            server_tps = statistics.median(s.decode_tokens_per_s for s in server)
            server_first = statistics.median(s.first_token_ms for s in server)
            daemon_first = statistics.median(s.first_token_ms for s in daemon)
            # kioskd and the server run back to back in every repetition: pair them too.
            paired_server = [
                k.decode_tokens_per_s / c.decode_tokens_per_s
                for k, c in zip(daemon, server, strict=True)
            ]
            first_pairs = [
                k.first_token_ms - c.first_token_ms for k, c in zip(daemon, server, strict=True)
            ]
            summary[str(length)] |= {
                "server_decode_tokens_per_s": round(server_tps, 2),
                "ratio_server_over_raw": round(server_tps / raw_tps, 4),
                "ratio_kioskd_over_server": round(daemon_tps / server_tps, 4),
                "ratio_kioskd_over_server_median_of_pairs": round(
                    statistics.median(paired_server), 4
                ),
                "server_first_chunk_ms": round(server_first, 1),
                "first_chunk_ms_kioskd_minus_server_median_of_pairs": round(
                    statistics.median(first_pairs), 1
                ),
                "ratio_first_chunk_kioskd_over_raw": round(
                    daemon_first / statistics.median(s.first_token_ms for s in raw), 4
                ),
                "ratio_first_chunk_server_over_raw": round(
                    server_first / statistics.median(s.first_token_ms for s in raw), 4
                ),
                "server_gap_p99_ms": _median_gap(server),
            }
    return summary


def first_chunk_pooled(samples: list[Sample]) -> dict[str, Any] | None:
    """Time to first chunk over every answer length: it does not depend on the length asked,
    and the model's one-token wait varies by +-30 % from answer to answer, so twice the samples
    halve the noise of the comparison."""
    if not any(s.system == "server" for s in samples):
        return None
    firsts = {
        system: [s.first_token_ms for s in samples if s.system == system]
        for system in ("raw", "kioskd", "server")
    }
    pairs = [
        k.first_token_ms - c.first_token_ms
        for k, c in zip(
            (s for s in samples if s.system == "kioskd"),
            (s for s in samples if s.system == "server"),
            strict=True,
        )
    ]
    return {
        "samples_per_system": len(pairs),
        **{f"{system}_ms_median": round(statistics.median(v), 1) for system, v in firsts.items()},
        "kioskd_minus_server_ms_median_of_pairs": round(statistics.median(pairs), 1),
        "kioskd_sooner_in_pairs": sum(diff < 0 for diff in pairs),
    }


def run_bench(
    *,
    reps: int,
    lengths: list[int],
    threads: int | None,
    model: str | None,
    out_dir: Path,
    idle_s: float = 60.0,
    vs_server: bool = False,
) -> dict[str, Any]:
    resolved = resolve(model).path
    thread_count = threads or default_threads()
    samples: list[Sample] = []
    settings = EngineSettings(
        path=resolved,
        threads=thread_count,
        threads_batch=thread_count,
        ctx=2048,
        max_tokens=max(lengths),
        temperature=0.0,
        system_prompt=SYSTEM_PROMPT,
        chat_format="auto",
    )
    # The engine renders and tokenizes the prompt for the raw loop and the bridge, so that all
    # three sides read the same tokens; the raw loop runs on llama-cpp-python's own Llama.
    engine = Engine(settings, TestHooks(ignore_eos=True))
    prompt = engine.prompt_tokens(QUESTION)
    raw = raw_llama(settings)
    with tempfile.TemporaryDirectory(prefix="kioskd-bench-") as tmp:
        workdir = Path(tmp)
        with (
            LocalBroker(free_port(), workdir) as broker,
            _daemon(workdir, broker.port, resolved, thread_count, max(lengths)) as daemon,
            contextlib.ExitStack() as extra,
        ):
            port = broker.port
            systems = ["raw", "kioskd"]
            server_process: psutil.Process | None = None
            _raw_sample(raw, prompt, 8)  # warm every side before measuring
            _mqtt_sample(port, 8)
            if vs_server:
                from daemon.bench.server import BRIDGE_PREFIX, Bridge, llama_server  # noqa: PLC0415

                server_port, server_pid = extra.enter_context(
                    llama_server(workdir, resolved, thread_count)
                )
                server_process = psutil.Process(server_pid)
                extra.enter_context(Bridge(mqtt_port=port, server_port=server_port, engine=engine))
                _mqtt_sample(port, 8, BRIDGE_PREFIX, "server")
                systems.append("server")
            for rep in range(reps):
                for length in lengths:
                    # Rotate the order, so no system always follows the same other one.
                    for system in rotated(systems, rep):
                        if system == "raw":
                            sample = _raw_sample(raw, prompt, length)
                        elif system == "kioskd":
                            sample = _mqtt_sample(port, length)
                        else:
                            sample = _mqtt_sample(port, length, BRIDGE_PREFIX, "server")
                        samples.append(sample)
                        print(
                            f"rep {rep + 1}/{reps} {system:6} {length:4} tokens: "
                            f"{sample.decode_tokens_per_s:6.1f} tok/s, first "
                            f"{sample.first_token_ms:6.1f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
            processes = [psutil.Process(daemon.pid)] + ([server_process] if server_process else [])
            rss_mib = [round(p.memory_info().rss / 2**20, 1) for p in processes]
            longest_rss_mib = _rss_after_longest_question_mib(port, daemon.pid)
            # The raw loop's process also holds the MQTT client and bridge: an upper bound.
            raw_rss_mib = round(psutil.Process().memory_info().rss / 2**20, 1)
            idle_percent = _idle_cpu_percent(processes, idle_s)
    rss_budget_mib = _rss_budget_mib(engine, resolved)
    engine.close()
    raw.close()
    result = {
        "command": command_line(),
        "model": str(resolved),
        "threads": thread_count,
        "reps": reps,
        "machine": machine(),
        "kioskd_rss_mib": rss_mib[0],
        "kioskd_rss_after_longest_question_mib": longest_rss_mib,
        "rss_budget_mib": rss_budget_mib,
        "raw_process_rss_mib": raw_rss_mib,
        "server_rss_mib": rss_mib[1] if server_process else None,
        "kioskd_idle_cpu_percent_of_one_core": idle_percent[0],
        "server_idle_cpu_percent_of_one_core": idle_percent[1] if server_process else None,
        "idle_s": idle_s,
        "summary": summarize(samples, lengths),
        "first_chunk_all_lengths": first_chunk_pooled(samples),
        "samples": [asdict(s) for s in samples],
    }
    write_result(result, out_dir, "bench.json")
    return result


def run_telemetry_bench(
    *, reps: int, tokens: int, threads: int | None, model: str | None, out_dir: Path
) -> dict[str, Any]:
    """Decode speed with P/health every 1 s against telemetry effectively off (once a day)."""
    resolved = resolve(model).path
    thread_count = threads or default_threads()
    fast, off = "bench/telemetry-1s", "bench/telemetry-off"
    rates: dict[str, list[float]] = {fast: [], off: []}
    with tempfile.TemporaryDirectory(prefix="kioskd-bench-") as tmp:
        workdir = Path(tmp)
        with (
            LocalBroker(free_port(), workdir) as broker,
            _daemon(
                workdir,
                broker.port,
                resolved,
                thread_count,
                tokens,
                prefix=fast,
                telemetry_interval_s=1.0,
            ),
            _daemon(
                workdir,
                broker.port,
                resolved,
                thread_count,
                tokens,
                prefix=off,
                telemetry_interval_s=86400.0,
            ),
        ):
            port = broker.port
            for rep in range(reps):
                for prefix in rotated([fast, off], rep):
                    sample = _mqtt_sample(port, tokens, prefix)
                    rates[prefix].append(sample.decode_tokens_per_s)
                    print(
                        f"rep {rep + 1}/{reps} {prefix:22} {sample.decode_tokens_per_s:6.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
    ratios = [a / b for a, b in zip(rates[fast], rates[off], strict=True)]
    result = {
        "command": command_line(),
        "model": str(resolved),
        "threads": thread_count,
        "tokens": tokens,
        "reps": reps,
        "telemetry_1s_tokens_per_s_median": round(statistics.median(rates[fast]), 2),
        "telemetry_off_tokens_per_s_median": round(statistics.median(rates[off]), 2),
        "drop_percent_of_medians": round(
            100 * (1 - statistics.median(rates[fast]) / statistics.median(rates[off])), 2
        ),
        "drop_percent_median_of_pairs": round(100 * (1 - statistics.median(ratios)), 2),
        "samples": rates,
    }
    write_result(result, out_dir, "bench-telemetry.json")
    return result
