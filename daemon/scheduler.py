"""Bounded FIFO in front of one generation worker: queue, busy, cancel, deadlines, drain."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.generation import Generation, Generator
from daemon.loglimit import LogLimiter
from daemon.messages import (
    ConversationInfo,
    Done,
    Error,
    ErrorCode,
    FinishReason,
    Queued,
    Request,
    RequestError,
    Timing,
    Usage,
)
from daemon.stream import ChunkBuffer, ReplyStream

log = logging.getLogger(__name__)

# Until a request has finished, retry_after_s guesses this long per request ahead.
_DEFAULT_REQUEST_S = 10.0

# After its grace, a running answer is told to stop, and a healthy worker does within a token.
# One that has not after this long is hung; waiting longer would only let systemd's stop timeout
# (20 s in the unit) kill kioskd before it says offline.
_STOP_WAIT_S = 5.0

_CUT_SHORT = "kioskd is shutting down; the answer was cut short"


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


@dataclass
class Counters:
    """Running totals for health; updated under the scheduler's lock."""

    answered: int = 0
    errors: int = 0
    rejected: int = 0
    cancelled: int = 0
    last_tokens_per_s: float | None = None
    last_first_token_ms: float | None = None


class Scheduler:
    """Runs one generation at a time; every accepted job gets exactly one terminal message."""

    def __init__(
        self,
        *,
        capacity: int,
        flush_ms: float = 0.0,
        max_chunk_chars: int | None = None,
        on_busy_change: Callable[[], None] = lambda: None,
        next_turn: Callable[[str], ConversationInfo] | None = None,
    ) -> None:
        """`on_busy_change` runs on the worker thread when a generation starts or ends;
        `next_turn` tells where a conversation stands, for a turn that ends unanswered."""
        self._on_busy_change = on_busy_change
        self._next_turn = next_turn or _first_turn
        self._log = LogLimiter(log)
        self._flush_ms = flush_ms
        self._max_chunk_chars = max_chunk_chars
        self._generator: Generator | None = None
        self._capacity = capacity
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._ready = False
        self._draining = False
        self._stopping = False
        self._abort_running = False
        self._overheated_retry_s: float | None = None
        self._next_deadline = float("inf")
        self._request_s = _DEFAULT_REQUEST_S
        self.counters = Counters()
        self.last_progress_monotonic = time.monotonic()
        self._worker = threading.Thread(target=self._run_worker, name="kioskd-worker", daemon=True)

    # --- state for health and the lifecycle -----------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        """Apply a new queue.capacity; requests already waiting keep their places."""
        with self._cond:
            self._capacity = capacity

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def running_id(self) -> str | None:
        running = self._running
        return None if running is None else running.request.id

    @property
    def overheated(self) -> bool:
        return self._overheated_retry_s is not None

    def set_overheated(self, retry_after_s: float | None) -> None:
        """Pause new generations (None resumes); queued requests wait, new ones are refused."""
        with self._cond:
            self._overheated_retry_s = retry_after_s
            self._cond.notify_all()

    def start(self, generator: Generator) -> None:
        """Start the worker once the model is warm; jobs submitted before wait in the queue."""
        with self._cond:
            self._generator = generator
            self._ready = True
        self._worker.start()

    # --- intake, called from the network thread --------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue or start `job`; the caller has refused ids that are already active."""
        with self._cond:
            if self._draining:
                self._refuse(
                    job.stream,
                    Error(
                        ErrorCode.SHUTTING_DOWN,
                        "kioskd is shutting down; ask again once its status is online",
                    ),
                )
                return
            if self._overheated_retry_s is not None:
                self._refuse(
                    job.stream,
                    Error(
                        ErrorCode.OVERHEATED,
                        "the kiosk is too hot and has paused answering; retry later",
                        retry_after_s=self._overheated_retry_s,
                    ),
                )
                return
            if self._running is None and not self._queue and self._ready:
                # Hand an idle worker its job directly: a second question arriving before the
                # worker wakes must see this one as running, not as waiting ahead of it.
                self._running = job
                self._cond.notify_all()
                return
            if len(self._queue) >= self._capacity:
                self._refuse(
                    job.stream,
                    Error(
                        ErrorCode.BUSY,
                        f"the queue is full ({self._capacity} waiting); retry later",
                        retry_after_s=self._retry_after_s(),
                    ),
                )
                return
            self._queue.append(job)
            job.stream.send(Queued(position=len(self._queue)))
            self._update_next_deadline()
            self._cond.notify_all()

    def reject(self, stream: ReplyStream, error: RequestError) -> None:
        """Answer a request that failed validation (counted as an error)."""
        with self._cond:
            self.counters.errors += 1
        stream.send(Error(error.code, error.message))

    def reject_busy(self, stream: ReplyStream, retry_after_s: float) -> None:
        """Refuse a request from a sender over its rate limit."""
        self._refuse(
            stream,
            Error(
                ErrorCode.BUSY,
                "too many questions from this sender; slow down",
                retry_after_s=round(max(0.1, retry_after_s), 1),
            ),
        )

    def count_refusal(self) -> None:
        """Count a request refused before it reached the scheduler (a duplicate id)."""
        with self._cond:
            self.counters.rejected += 1

    def _refuse(self, stream: ReplyStream, error: Error) -> None:
        """Count, log and send a refusal of a request that will not be answered."""
        self.count_refusal()
        self._log.log(
            logging.INFO,
            str(error.code),
            "request %s refused: %s",
            stream.request_id,
            error.code,
            extra={"request_id": stream.request_id, "code": str(error.code)},
        )
        stream.send(error)

    def is_active(self, request_id: str) -> bool:
        """Whether a request with this id is running or queued."""
        with self._cond:
            return self._find(request_id) is not None

    def cancel(self, request_id: str) -> bool:
        """Cancel a running or queued request; False when the id is unknown."""
        with self._cond:
            job = self._find(request_id)
            if job is None:
                return False
            job.cancelled.set()
            if job is not self._running:
                self._queue.remove(job)
                self._update_next_deadline()
                self._finish_unstarted(job, "cancelled")
            return True

    def _find(self, request_id: str) -> Job | None:
        if self._running is not None and self._running.request.id == request_id:
            return self._running
        return next((job for job in self._queue if job.request.id == request_id), None)

    # --- shutdown ------------------------------------------------------------------------

    def drain(self, grace_s: float) -> bool:
        """Refuse new jobs, end queued ones, give the running one `grace_s`, stop the worker.

        Returns whether the worker has stopped (False: it is hung, and may still be in the model).
        """
        with self._cond:
            self._draining = True
            while self._queue:
                self._refuse(
                    self._queue.popleft().stream,
                    Error(
                        ErrorCode.SHUTTING_DOWN,
                        "kioskd is shutting down; the question was not answered",
                    ),
                )
            deadline = time.monotonic() + grace_s
            while self._running is not None and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._abort_running = True
            self._stopping = True
            self._cond.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            # The generation loop checks should_stop after every token.
            self._worker.join(timeout=_STOP_WAIT_S)
        if not self._worker.is_alive():
            return True
        with self._cond:
            hung = self._running
        log.error("the generation thread did not stop within %.0f s of shutdown", _STOP_WAIT_S)
        if hung is not None:
            # Its own terminal message may never come; the stream refuses a second one if it does.
            hung.stream.send(Error(ErrorCode.SHUTTING_DOWN, _CUT_SHORT))
        return False

    # --- the worker thread ---------------------------------------------------------------

    def _run_worker(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            self._busy_changed()
            try:
                self._run_job(job)
            except Exception:
                log.exception("request %s failed unexpectedly", job.request.id)
                job.stream.send(Error(ErrorCode.INTERNAL, "internal error; see the kiosk's log"))
            finally:
                with self._cond:
                    self._running = None
                    self.last_progress_monotonic = time.monotonic()
                    self._cond.notify_all()
                self._busy_changed()

    def _busy_changed(self) -> None:
        try:
            self._on_busy_change()
        except Exception:
            log.exception("busy-change hook failed")

    def _next_job(self) -> Job | None:
        with self._cond:
            while True:
                if self._running is not None:
                    # Handed over by submit(); even when stopping it must get its terminal message.
                    return self._running
                if self._stopping:
                    return None
                self._expire_deadlines()
                if self._queue and self._ready and self._overheated_retry_s is None:
                    job = self._queue.popleft()
                    self._running = job
                    self._update_next_deadline()
                    return job
                timeout = self._next_deadline - time.monotonic()
                self._cond.wait(timeout if timeout != float("inf") else None)

    def _run_job(self, job: Job) -> None:
        request = job.request
        started = time.monotonic()
        self.last_progress_monotonic = started

        chunks = ChunkBuffer(job.stream, flush_ms=self._flush_ms, max_chars=self._max_chunk_chars)

        def should_stop() -> bool:
            self.last_progress_monotonic = time.monotonic()
            if self.last_progress_monotonic >= self._next_deadline:
                with self._cond:
                    self._expire_deadlines()
            return job.cancelled.is_set() or self._abort_running

        generator = self._generator
        if generator is None:  # the worker only runs after start(); keeps mypy informed
            raise RuntimeError("scheduler started without a generator")
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
            with self._cond:
                self.counters.errors += 1
            job.stream.send(Error(exc.code, exc.message))
            return
        except Exception as exc:
            log.exception("generation failed for %s", request.id)
            chunks.flush()  # the text so far, before the error that ends the stream
            with self._cond:
                self.counters.errors += 1
            job.stream.send(Error(ErrorCode.MODEL_ERROR, f"the model failed: {exc}"))
            return

        chunks.flush()
        if result.stopped and not job.cancelled.is_set():
            with self._cond:
                self.counters.errors += 1
            job.stream.send(Error(ErrorCode.SHUTTING_DOWN, _CUT_SHORT))
            self._log_end(job, "shutting_down", result, started)
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
        with self._cond:
            if reason == "cancelled":
                self.counters.cancelled += 1
            else:
                self.counters.answered += 1
            self.counters.last_tokens_per_s = timing.tokens_per_s
            self.counters.last_first_token_ms = timing.first_token_ms
            # A slow moving average keeps retry_after_s steady.
            self._request_s = 0.7 * self._request_s + 0.3 * (result.end_monotonic - started)
        self._log_end(job, reason, result, started)

    def _log_end(self, job: Job, reason: str, result: Generation, started: float) -> None:
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

    # --- helpers, called with the lock held -----------------------------------------------

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        if now < self._next_deadline:
            return
        expired = [job for job in self._queue if (job.deadline_monotonic or float("inf")) <= now]
        for job in expired:
            self._queue.remove(job)
            self._finish_unstarted(job, "deadline")
        self._update_next_deadline()

    def _finish_unstarted(self, job: Job, reason: FinishReason) -> None:
        waited_ms = (time.monotonic() - job.received_monotonic) * 1000
        if reason == "cancelled":
            self.counters.cancelled += 1
        else:
            # It never reached the model: health counts it with the refused ones.
            self.counters.rejected += 1
        conversation_id = job.request.conversation_id
        job.stream.send(
            Done(
                "",
                reason,
                Usage(0, 0),
                Timing(waited_ms, None, waited_ms, None),
                conversation=None if conversation_id is None else self._next_turn(conversation_id),
            )
        )
        log.info(
            "request %s ended: %s while queued after %d ms",
            job.request.id,
            reason,
            round(waited_ms),
            extra={"request_id": job.request.id, "code": reason},
        )

    def _update_next_deadline(self) -> None:
        deadlines = [job.deadline_monotonic for job in self._queue]
        self._next_deadline = min((d for d in deadlines if d is not None), default=float("inf"))

    def _retry_after_s(self) -> float:
        ahead = len(self._queue) + (1 if self._running is not None else 0)
        return round(max(1.0, self._request_s * ahead), 1)


def _first_turn(conversation_id: str) -> ConversationInfo:
    return ConversationInfo(conversation_id, 1, 0, 0, new=True)


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
