"""Bounded FIFO in front of one generation worker: queue, busy, cancel, deadlines, drain."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from daemon.generation import Generator
from daemon.jobs import CUT_SHORT, Job, Outcome, finish_unstarted, run_job
from daemon.loglimit import LogLimiter
from daemon.messages import (
    ConversationInfo,
    Error,
    ErrorCode,
    FinishReason,
    Queued,
    RequestError,
)
from daemon.stream import ReplyStream

log = logging.getLogger(__name__)

# Until a request has finished, retry_after_s guesses this long per request ahead.
_DEFAULT_REQUEST_S = 10.0

# After its grace, a running answer is told to stop, and a healthy worker does within a token.
# One that has not after this long is hung; waiting longer would only let systemd's stop timeout
# (20 s in the unit) kill kioskd before it says offline.
_STOP_WAIT_S = 5.0


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
            hung.stream.send(Error(ErrorCode.SHUTTING_DOWN, CUT_SHORT))
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
        self.last_progress_monotonic = time.monotonic()

        def should_stop() -> bool:
            self.last_progress_monotonic = time.monotonic()
            if self.last_progress_monotonic >= self._next_deadline:
                with self._cond:
                    self._expire_deadlines()
            return job.cancelled.is_set() or self._abort_running

        generator = self._generator
        if generator is None:  # the worker only runs after start(); keeps mypy informed
            raise RuntimeError("scheduler started without a generator")
        run_job(
            job,
            generator,
            should_stop=should_stop,
            flush_ms=self._flush_ms,
            max_chunk_chars=self._max_chunk_chars,
            record=self._record,
        )

    def _record(self, outcome: Outcome) -> None:
        """Count how a job that reached the model ended."""
        with self._cond:
            counters = self.counters
            if outcome.reason is None:
                counters.errors += 1
            elif outcome.reason == "cancelled":
                counters.cancelled += 1
            else:
                counters.answered += 1
            if outcome.timing is not None:
                counters.last_tokens_per_s = outcome.timing.tokens_per_s
                counters.last_first_token_ms = outcome.timing.first_token_ms
            if outcome.run_s is not None:
                # A slow moving average keeps retry_after_s steady.
                self._request_s = 0.7 * self._request_s + 0.3 * outcome.run_s

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
        if reason == "cancelled":
            self.counters.cancelled += 1
        else:
            # It never reached the model: health counts it with the refused ones.
            self.counters.rejected += 1
        conversation_id = job.request.conversation_id
        conversation = None if conversation_id is None else self._next_turn(conversation_id)
        finish_unstarted(job, reason, conversation)

    def _update_next_deadline(self) -> None:
        deadlines = [job.deadline_monotonic for job in self._queue]
        self._next_deadline = min((d for d in deadlines if d is not None), default=float("inf"))

    def _retry_after_s(self) -> float:
        ahead = len(self._queue) + (1 if self._running is not None else 0)
        return round(max(1.0, self._request_s * ahead), 1)


def _first_turn(conversation_id: str) -> ConversationInfo:
    return ConversationInfo(conversation_id, 1, 0, 0, new=True)
