"""What every benchmark shares: a private broker and kioskd daemons, asking them, and
interleaving the cells of a run (results.py: what a result records, and its JSON).

A daemon here is a `python -m daemon run` subprocess on a private mosquitto (localbroker), with
end-of-turn ignored (KIOSKD_TEST_IGNORE_EOS) so that every answer has exactly the asked length.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import yaml

from daemon.asker import Answer, ask
from daemon.bench.localbroker import LocalBroker, free_port
from daemon.bench.stats import gap_p99_ms
from daemon.config import default_threads
from daemon.engine import Engine, EngineSettings
from daemon.generation import Generation
from daemon.models import resolve
from daemon.testhooks import TestHooks

KIOSKD_PREFIX = "bench/kiosk"
QUESTION = "Explain briefly how a factory conveyor belt works."
SYSTEM_PROMPT = "You are a helpful assistant on a factory-floor kiosk. Answer briefly and plainly."
# Every answer runs to exactly the asked length: end-of-turn is ignored.
IGNORE_EOS: dict[str, str | None] = {"KIOSKD_TEST_IGNORE_EOS": "1"}
Cell = TypeVar("Cell")
Measured = TypeVar("Measured")


# --- model and threads -----------------------------------------------------------------------


def resolve_model(model: str | Path | None) -> Path:
    """The GGUF named, else the one kioskd itself would load."""
    return resolve(str(model) if model else None).path


def resolve_threads(threads: int | None) -> int:
    """The threads asked for, else as many as kioskd would use."""
    return threads or default_threads()


def engine_settings(
    model: Path, threads: int, *, max_tokens: int, system_prompt: str = SYSTEM_PROMPT
) -> EngineSettings:
    """The benchmarks' engine: temperature 0, a 2048-token context, the chat format the GGUF
    declares."""
    return EngineSettings(
        path=model,
        threads=threads,
        threads_batch=threads,
        ctx=2048,
        max_tokens=max_tokens,
        temperature=0.0,
        system_prompt=system_prompt,
        chat_format="auto",
    )


def bench_engine(
    model: Path, threads: int, *, max_tokens: int, system_prompt: str = SYSTEM_PROMPT
) -> Engine:
    """An in-process engine whose answers have exactly the asked length (end-of-turn ignored)."""
    settings = engine_settings(model, threads, max_tokens=max_tokens, system_prompt=system_prompt)
    return Engine(settings, TestHooks(ignore_eos=True))


def generate_silently(
    generate: Callable[..., Generation],
    question: str,
    *,
    max_tokens: int | None,
    temperature: float | None = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
    **more: Any,
) -> Generation:
    """One answer of Engine.generate or Turns.generate, its text thrown away as it comes: the
    benchmarks time answers, they do not show them."""
    return generate(
        question,
        max_tokens=max_tokens,
        temperature=temperature,
        on_text=lambda _text: None,
        should_stop=should_stop,
        **more,
    )


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


# --- processes -------------------------------------------------------------------------------


def spawn(
    workdir: Path, name: str, args: Sequence[str], env: Mapping[str, str | None] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m daemon ARGS`, logging to workdir/NAME.log.

    env: on top of this process's environment; a None value removes that variable, so that a
    baseline runs without settings the calling shell happens to have.
    """
    process_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            process_env.pop(key, None)
        else:
            process_env[key] = value
    with (workdir / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", *args],
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def write_config(workdir: Path, name: str, config: Mapping[str, Any]) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    return path


def stop(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM, as systemd stops kioskd, and wait for the clean exit."""
    process.send_signal(signal.SIGTERM)
    process.wait(timeout_s)


@dataclass(frozen=True)
class DaemonSpec:
    """One daemon of a run: its topic prefix, and what differs from the others."""

    prefix: str = KIOSKD_PREFIX
    telemetry_interval_s: float = 30.0
    stream: dict[str, Any] | None = None  # the config's stream section
    env: dict[str, str | None] = field(default_factory=dict)  # OpenMP settings, say
    sections: dict[str, Any] = field(default_factory=dict)  # more config sections


@contextmanager
def start_daemon(
    workdir: Path, port: int, spec: DaemonSpec, *, model: Path, threads: int, max_tokens: int
) -> Iterator[subprocess.Popen[bytes]]:
    """A kioskd subprocess on the broker, answered a first question (so loaded and warm)."""
    name = spec.prefix.replace("/", "-")
    config: dict[str, Any] = {
        # Distinct client ids: two daemons sharing one would keep kicking each other off.
        "mqtt": {"port": port, "topic_prefix": spec.prefix, "client_id": f"kioskd-{name}"},
        "telemetry": {"interval_s": spec.telemetry_interval_s},
        "model": {
            "path": str(model),
            "threads": threads,
            "max_tokens": max_tokens,
            "system_prompt": SYSTEM_PROMPT,
            "temperature": 0.0,
        },
        "logging": {"level": "WARNING"},
        **({"stream": spec.stream} if spec.stream else {}),
        **spec.sections,
    }
    path = write_config(workdir, name, config)
    process = spawn(workdir, name, ["run", "--config", str(path)], spec.env | IGNORE_EOS)
    try:
        # A question sent before kioskd has subscribed is lost: ask until one is answered.
        deadline = time.monotonic() + 120
        while (
            ask("ping", host="127.0.0.1", port=port, prefix=spec.prefix, max_tokens=1, timeout_s=5)
        ).final is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"kioskd did not answer; see {workdir / name}.log")
        yield process
    finally:
        stop(process)


@dataclass(frozen=True)
class Daemons:
    """A private broker and the daemons of a run on it, by topic prefix."""

    port: int
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]]


@contextmanager
def private_daemons(
    specs: Sequence[DaemonSpec], *, model: Path, threads: int, max_tokens: int
) -> Iterator[Daemons]:
    """A temporary directory, a mosquitto on a free port, and one warm daemon per spec on it;
    all stopped and removed on the way out."""
    with (
        tempfile.TemporaryDirectory(prefix="kioskd-bench-") as tmp,
        ExitStack() as stack,
    ):
        workdir = Path(tmp)
        broker = stack.enter_context(LocalBroker(free_port(), workdir))
        processes = {
            spec.prefix: stack.enter_context(
                start_daemon(
                    workdir, broker.port, spec, model=model, threads=threads, max_tokens=max_tokens
                )
            )
            for spec in specs
        }
        yield Daemons(broker.port, workdir, processes)


# --- asking ----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Sample:
    """One timed answer of the raw loop, of kioskd, or of llama_cpp.server behind a bridge."""

    system: str  # "raw", "kioskd" or "server" (llama_cpp.server + bridge); else a variant
    tokens: int
    decode_tokens_per_s: float
    first_token_ms: float  # raw: prompt + first token; kioskd: as seen by the client
    model_first_token_ms: float  # the model's own time to the first token
    first_chunk_overhead_ms: float | None  # kioskd only: client first chunk - model first token
    gap_p99_ms: float | None = None  # p99 time between chunks (raw: between tokens)


def mqtt_sample(
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
    overhead_ms = client_first_ms - model_first_ms
    return Sample(system, tokens, decode, client_first_ms, model_first_ms, overhead_ms, gap_ms)


# --- interleaving ----------------------------------------------------------------------------


def rotated(cells: Sequence[Cell], rep: int) -> list[Cell]:
    """The cells in an order that starts one later every repetition, so none always goes first."""
    shift = rep % len(cells)
    return [*cells[shift:], *cells[:shift]]


def interleave(
    cells: Sequence[Cell],
    reps: int,
    measure: Callable[[Cell, int], Measured],
    label: Callable[[Cell, Measured], str],
) -> list[tuple[Cell, Measured]]:
    """Measure every cell once per repetition, in rotated order, so that this machine's drift
    hits every cell alike; each measurement is noted on stderr as it comes.

    The result is in repetition order, so the measurements of two cells pair up by repetition.
    """
    measured: list[tuple[Cell, Measured]] = []
    for rep in range(reps):
        for cell in rotated(cells, rep):
            result = measure(cell, rep)
            measured.append((cell, result))
            progress(f"rep {rep + 1}/{reps} {label(cell, result)}")
    return measured


def progress(line: str) -> None:
    """A line on stderr while a benchmark runs (stdout is for its report)."""
    print(line, file=sys.stderr, flush=True)
