"""One accepted request's run through the Generator, to its one terminal message.

The scheduler decides which job runs and when; this module runs one: it streams the text in
chunks, turns the Generation (or the failure) into done or error, and reports the outcome for
the scheduler's counters. A job that never reaches the model ends here too (cancelled, deadline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.generation import Generation, Generator
from daemon.messages import (
    ConversationInfo,
    Done,
    Error,
    ErrorCode,
    FinishReason,
    Request,
    RequestError,
    Timing,
    Usage,
)
from daemon.stream import ChunkBuffer, ReplyStream

log = logging.getLogger(__name__)

CUT_SHORT = "kioskd is shutting down; the answer was cut short"


@dataclass
class Job:
    """A request accepted into the scheduler, with its reply stream."""

    request: Request
    stream: ReplyStream
    received_monotonic: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline_monotonic(self) -> float | None:
        if self.request.deadline_s is None:
            return None
        return self.received_monotonic + self.request.deadline_s


@dataclass(frozen=True)
class Outcome:
    """How a job that reached the model ended, for the counters."""

    reason: FinishReason | None  # None: it ended in an error
    timing: Timing | None = None
    run_s: float | None = None  # from the start of its generation to its end


def run_job(
    job: Job,
    generator: Generator,
    *,
    should_stop: Callable[[], bool],
    flush_ms: float,
    max_chunk_chars: int | None,
    record: Callable[[Outcome], None],
) -> None:
    """Generate `job`'s answer and send its terminal message; `record` gets the outcome.

    An error is recorded before it is sent and an answer after, as health has always counted.
    """
    request = job.request
    started = time.monotonic()
    chunks = ChunkBuffer(job.stream, flush_ms=flush_ms, max_chars=max_chunk_chars)
    try:
        result = generator.generate(
            request.question,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            on_text=chunks.add,
            should_stop=should_stop,
            stop=request.stop,
            answer_format=request.answer_format,
            conversation_id=request.conversation_id,
        )
    except RequestError as exc:
        record(Outcome(None))
        job.stream.send(Error(exc.code, exc.message))
        return
    except Exception as exc:
        log.exception("generation failed for %s", request.id)
        chunks.flush()  # the text so far, before the error that ends the stream
        record(Outcome(None))
        job.stream.send(Error(ErrorCode.MODEL_ERROR, f"the model failed: {exc}"))
        return

    chunks.flush()
    if result.stopped and not job.cancelled.is_set():
        record(Outcome(None))
        job.stream.send(Error(ErrorCode.SHUTTING_DOWN, CUT_SHORT))
        _log_end(job, "shutting_down", result)
        return
    reason: FinishReason
    if result.stopped:
        reason = "cancelled"
    elif result.hit_length:
        reason = "length"
    else:
        reason = "stop"
    timing = _timing(job.received_monotonic, started, result)
    usage = Usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
    job.stream.send(
        Done(
            result.text,
            reason,
            usage,
            timing,
            json=result.json,
            json_error=result.json_error,
            conversation=result.conversation,
        )
    )
    record(Outcome(reason, timing, result.end_monotonic - started))
    _log_end(job, reason, result)


def finish_unstarted(
    job: Job, reason: FinishReason, conversation: ConversationInfo | None = None
) -> None:
    """End a job that never reached the model (cancelled or past its deadline while queued)."""
    waited_ms = (time.monotonic() - job.received_monotonic) * 1000
    job.stream.send(
        Done(
            "",
            reason,
            Usage(0, 0),
            Timing(waited_ms, None, waited_ms, None),
            conversation=conversation,
        )
    )
    log.info(
        "request %s ended: %s while queued after %d ms",
        job.request.id,
        reason,
        round(waited_ms),
        extra={"request_id": job.request.id, "code": reason},
    )


def _log_end(job: Job, reason: str, result: Generation) -> None:
    first_ms = (
        None
        if result.first_token_monotonic is None
        else round((result.first_token_monotonic - job.received_monotonic) * 1000)
    )
    log.info(
        "request %s ended: %s, %d tokens, first token %s ms, total %d ms",
        job.request.id,
        reason,
        result.completion_tokens,
        first_ms,
        round((result.end_monotonic - job.received_monotonic) * 1000),
        extra={"request_id": job.request.id, "code": reason},
    )


def _timing(received: float, started: float, result: Generation) -> Timing:
    first = result.first_token_monotonic
    tokens_per_s = None
    if first is not None and result.completion_tokens > 1 and result.end_monotonic > first:
        # Decode speed: tokens after the first, over the time after the first.
        tokens_per_s = (result.completion_tokens - 1) / (result.end_monotonic - first)
    return Timing(
        queued_ms=(started - received) * 1000,
        first_token_ms=None if first is None else (first - received) * 1000,
        total_ms=(result.end_monotonic - received) * 1000,
        tokens_per_s=tokens_per_s,
    )
