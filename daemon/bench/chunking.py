"""`kioskd bench chunking`: messages per answer, first chunk and speed for each stream.flush_ms.

One daemon per flush_ms on one private broker, identical otherwise, asked in turn (harness).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from daemon.bench.harness import (
    DaemonSpec,
    ask_streamed,
    interleave,
    private_daemons,
    resolve_model,
    resolve_threads,
)
from daemon.bench.results import FLATTEN, Run, this_run
from daemon.bench.stats import gap_p99_ms, median_or_none


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


@dataclass(frozen=True)
class ChunkingRow:
    """Medians over the repetitions at one flush_ms."""

    chunk_messages_median: float
    all_messages_median: float
    tokens_per_chunk_median: float
    first_chunk_ms_median: float
    end_to_end_tokens_per_s_median: float
    chunk_decode_tokens_per_s_median: float | None
    chunk_gap_ms_p99_median: float | None
    model_decode_tokens_per_s_median: float | None
    text_mismatches: int


@dataclass(frozen=True)
class ChunkingResult:
    run: Run = field(metadata=FLATTEN)
    tokens: int
    flushes_ms: list[float]
    summary: dict[str, ChunkingRow]  # by flush_ms, as "%g"
    samples: list[ChunkingSample]


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


def chunking_summary(
    samples: list[ChunkingSample], flushes_ms: list[float]
) -> dict[str, ChunkingRow]:
    summary: dict[str, ChunkingRow] = {}
    for flush_ms in flushes_ms:
        rows = [s for s in samples if s.flush_ms == flush_ms]
        summary[f"{flush_ms:g}"] = ChunkingRow(
            chunk_messages_median=statistics.median(s.chunk_messages for s in rows),
            all_messages_median=statistics.median(s.all_messages for s in rows),
            tokens_per_chunk_median=round(statistics.median(s.tokens_per_chunk for s in rows), 2),
            first_chunk_ms_median=round(statistics.median(s.first_chunk_ms for s in rows), 1),
            end_to_end_tokens_per_s_median=round(
                statistics.median(s.end_to_end_tokens_per_s for s in rows), 2
            ),
            chunk_decode_tokens_per_s_median=median_or_none(
                [s.chunk_decode_tokens_per_s for s in rows]
            ),
            chunk_gap_ms_p99_median=median_or_none([s.chunk_gap_ms_p99 for s in rows]),
            model_decode_tokens_per_s_median=median_or_none(
                [s.model_decode_tokens_per_s for s in rows]
            ),
            text_mismatches=sum(not s.text_matches for s in rows),
        )
    return summary


def run_chunking(
    *,
    reps: int,
    tokens: int,
    threads: int | None,
    flushes_ms: list[float],
    model: str | None,
) -> ChunkingResult:
    """Messages per answer, latency and speed for each stream.flush_ms, one daemon each;
    ."""
    resolved = resolve_model(model)
    thread_count = resolve_threads(threads)
    specs = [DaemonSpec(_flush_prefix(ms), stream={"flush_ms": ms}) for ms in flushes_ms]
    with private_daemons(specs, model=resolved, threads=thread_count, max_tokens=tokens) as run:
        measured = interleave(
            flushes_ms,
            reps,
            lambda flush_ms, rep: _chunking_sample(run.port, tokens, flush_ms, rep),
            lambda flush_ms, sample: (
                f"flush {flush_ms:5g} ms: {sample.chunk_messages:4} chunks, first "
                f"{sample.first_chunk_ms:6.1f} ms, {sample.end_to_end_tokens_per_s:6.1f} tok/s "
                "end to end"
            ),
        )
    samples = [sample for _flush, sample in measured]
    summary = chunking_summary(samples, flushes_ms)
    how = this_run(resolved, thread_count, reps)
    return ChunkingResult(how, tokens, flushes_ms, summary, samples)
