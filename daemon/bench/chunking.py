"""`kioskd bench --chunking` (messages per answer for each stream.flush_ms), and the helpers
the multi-daemon benchmarks share.

Several kioskd daemons run on one private broker, identical except for the setting under
test, and are asked in turn, rotating the order every repetition so that this machine's drift
hits every variant alike (the pattern of `run_telemetry_bench`).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.bench.compare import (
    _daemon,
    ask_streamed,
    command_line,
    gap_p99_ms,
    machine,
    median_or_none,
    rotated,
    write_result,
)
from daemon.bench.localbroker import LocalBroker, free_port
from daemon.config import default_threads
from daemon.models import resolve


@dataclass(frozen=True)
class ChunkingSample:
    rep: int
    flush_ms: float
    completion_tokens: int
    chunk_messages: int
    all_messages: int  # every message of the answer: chunks and the done
    tokens_per_chunk: float
    first_chunk_ms: float  # question sent -> first chunk arrived
    end_to_end_tokens_per_s: float  # completion tokens / (question sent -> done arrived)
    # (tokens - 1) / (first -> last chunk): inflated when chunks are batched, since the first
    # chunk comes late and the last one together with the done; None with a single chunk.
    chunk_decode_tokens_per_s: float | None
    chunk_gap_ms_p99: float | None  # between consecutive chunk arrivals; None with one chunk
    # done.timing.tokens_per_s: the model's own decode rate, untouched by batching; it tells a
    # slower model from slower delivery.
    model_decode_tokens_per_s: float | None
    text_matches: bool  # the chunks' texts joined equal done.text


def _flush_prefix(flush_ms: float) -> str:
    return f"bench/flush-{flush_ms:g}ms"


def _chunking_sample(port: int, tokens: int, flush_ms: float, rep: int) -> ChunkingSample:
    streamed = ask_streamed(port, tokens, _flush_prefix(flush_ms))
    answer, final, arrivals = streamed.answer, streamed.final, streamed.chunk_arrivals
    completion = int(final["usage"]["completion_tokens"])
    done_s = answer.arrivals_monotonic[-1] - answer.sent_monotonic
    span_s = arrivals[-1] - arrivals[0]
    return ChunkingSample(
        rep=rep,
        flush_ms=flush_ms,
        completion_tokens=completion,
        chunk_messages=len(arrivals),
        all_messages=len(answer.messages),
        tokens_per_chunk=round(completion / len(arrivals), 3),
        first_chunk_ms=round(streamed.first_chunk_ms, 2),
        end_to_end_tokens_per_s=round(completion / done_s, 2),
        chunk_decode_tokens_per_s=round((completion - 1) / span_s, 2) if span_s > 0 else None,
        chunk_gap_ms_p99=gap_p99_ms(arrivals),
        model_decode_tokens_per_s=_rounded(final["timing"]["tokens_per_s"]),
        text_matches="".join(streamed.chunk_texts) == final["text"],
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def chunking_summary(samples: list[ChunkingSample], flushes_ms: list[float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for flush_ms in flushes_ms:
        rows = [s for s in samples if s.flush_ms == flush_ms]
        summary[f"{flush_ms:g}"] = {
            "chunk_messages_median": statistics.median(s.chunk_messages for s in rows),
            "all_messages_median": statistics.median(s.all_messages for s in rows),
            "tokens_per_chunk_median": round(
                statistics.median(s.tokens_per_chunk for s in rows), 2
            ),
            "first_chunk_ms_median": round(statistics.median(s.first_chunk_ms for s in rows), 1),
            "end_to_end_tokens_per_s_median": round(
                statistics.median(s.end_to_end_tokens_per_s for s in rows), 2
            ),
            "chunk_decode_tokens_per_s_median": median_or_none(
                [s.chunk_decode_tokens_per_s for s in rows]
            ),
            "chunk_gap_ms_p99_median": median_or_none([s.chunk_gap_ms_p99 for s in rows]),
            "model_decode_tokens_per_s_median": median_or_none(
                [s.model_decode_tokens_per_s for s in rows]
            ),
            "text_mismatches": sum(not s.text_matches for s in rows),
        }
    return summary


def run_chunking_bench(
    *,
    reps: int,
    tokens: int,
    threads: int | None,
    flushes_ms: list[float],
    model: str | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Messages per answer, latency and speed for each stream.flush_ms, one daemon each."""
    resolved = resolve(model).path
    thread_count = threads or default_threads()
    samples: list[ChunkingSample] = []
    with (
        tempfile.TemporaryDirectory(prefix="kioskd-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        broker = stack.enter_context(LocalBroker(free_port(), workdir))
        for flush_ms in flushes_ms:
            stack.enter_context(
                _daemon(
                    workdir,
                    broker.port,
                    resolved,
                    thread_count,
                    tokens,
                    prefix=_flush_prefix(flush_ms),
                    stream={"flush_ms": flush_ms},
                )
            )
        for rep in range(reps):
            for flush_ms in rotated(flushes_ms, rep):
                sample = _chunking_sample(broker.port, tokens, flush_ms, rep)
                samples.append(sample)
                print(
                    f"rep {rep + 1}/{reps} flush {flush_ms:5g} ms: {sample.chunk_messages:4} "
                    f"chunks, first {sample.first_chunk_ms:6.1f} ms, "
                    f"{sample.end_to_end_tokens_per_s:6.1f} tok/s end to end",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "command": command_line(),
        "model": str(resolved),
        "threads": thread_count,
        "tokens": tokens,
        "reps": reps,
        "flushes_ms": flushes_ms,
        "machine": machine(),
        "summary": chunking_summary(samples, flushes_ms),
        "samples": [asdict(s) for s in samples],
    }
    write_result(result, out_dir, "bench-chunking.json")
    return result


def render_chunking(result: dict[str, Any]) -> str:
    """The chunking summary as a short table (medians over the repetitions)."""
    lines = [
        f"{result['tokens']} tokens, {result['threads']} model threads, {result['reps']} reps",
        f"{'flush ms':>8} {'chunks':>6} {'msgs':>5} {'tok/chunk':>9} {'first ms':>8} "
        f"{'e2e tok/s':>9} {'chunk tok/s*':>12} {'model tok/s':>11} {'gap p99 ms':>10} "
        f"{'mismatch':>8}",
    ]
    for flush, row in result["summary"].items():
        lines.append(
            f"{flush:>8} {row['chunk_messages_median']:>6} {row['all_messages_median']:>5} "
            f"{row['tokens_per_chunk_median']:>9} {row['first_chunk_ms_median']:>8} "
            f"{row['end_to_end_tokens_per_s_median']:>9} "
            f"{_show(row['chunk_decode_tokens_per_s_median']):>12} "
            f"{_show(row['model_decode_tokens_per_s_median']):>11} "
            f"{_show(row['chunk_gap_ms_p99_median']):>10} {row['text_mismatches']:>8}"
        )
    lines.append("* first to last chunk: overstated when chunks are batched")
    return "\n".join(lines)


def _show(value: object) -> str:
    return "-" if value is None else str(value)
