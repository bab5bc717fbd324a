"""The Scheduler with a fake Generator: order, cancel, deadlines, busy, drain, one terminal each."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from daemon.jobs import Job
from daemon.messages import ErrorCode, Request, RequestError
from daemon.outlet import ConnectionOutlet
from daemon.scheduler import Scheduler
from daemon.stream import ReplyStream
from tests.unit.fakes import WAIT_S, FakeGenerator, RecordingConnection, summaries


class Kiosk:
    """A scheduler in front of a fake generator, its replies recorded."""

    def __init__(self, *, capacity: int = 4, flush_ms: float = 0.0) -> None:
        self.generator = FakeGenerator()
        self.connection = RecordingConnection()
        self._outlet = ConnectionOutlet(self.connection)
        self._idle = threading.Condition()
        self._busy_changes = 0
        self.scheduler = Scheduler(
            capacity=capacity, flush_ms=flush_ms, on_busy_change=self._busy_changed
        )
        self.asked: list[str] = []

    def _busy_changed(self) -> None:
        with self._idle:
            self._busy_changes += 1
            self._idle.notify_all()

    def ask(self, request_id: str, question: str, *, deadline_s: float | None = None) -> Job:
        self.asked.append(request_id)
        job = Job(
            Request(request_id, question, deadline_s=deadline_s),
            ReplyStream(self._outlet, f"kiosk/k1/answer/{request_id}", request_id),
        )
        self.scheduler.submit(job)
        return job

    def messages(self, request_id: str) -> list[tuple[object, ...]]:
        """The stream of `request_id` once it has ended (its one terminal message, last)."""
        self.connection.wait_terminal(request_id)
        return summaries(self.connection.stream(request_id))

    def wait_idle(self) -> None:
        """Until the worker has let go of its job (it says so after the terminal message)."""
        with self._idle:
            assert self._idle.wait_for(lambda: not self.scheduler.busy, WAIT_S)


@pytest.fixture
def kiosk() -> Iterator[Kiosk]:
    kiosk = Kiosk()
    kiosk.scheduler.start(kiosk.generator)
    yield kiosk
    kiosk.generator.release_all()
    assert kiosk.scheduler.drain(grace_s=WAIT_S)
    for request_id in kiosk.asked:
        summaries(kiosk.connection.stream(request_id))  # exactly one terminal each, whatever


def _answer(question: str) -> list[tuple[object, ...]]:
    words = f"answer to {question}".split()
    return [("chunk", f"{word} ") for word in words] + [
        ("done", "stop", "".join(f"{word} " for word in words))
    ]


def test_questions_are_answered_one_at_a_time_in_the_order_they_came(kiosk: Kiosk) -> None:
    kiosk.generator.hold("first")
    kiosk.ask("a", "first")
    kiosk.generator.wait_started("first")
    kiosk.ask("b", "second")
    kiosk.ask("c", "third")
    kiosk.generator.release("first")
    assert kiosk.messages("c") == [("queued", 2), *_answer("third")]
    assert kiosk.messages("b") == [("queued", 1), *_answer("second")]
    assert kiosk.messages("a") == _answer("first")
    assert kiosk.generator.started == ["first", "second", "third"]
    # One at a time: each answer's messages all come before the next answer's first chunk.
    answering = [p.body["id"] for p in kiosk.connection.published() if p.body["type"] != "queued"]
    assert answering == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    kiosk.wait_idle()
    assert kiosk.scheduler.counters.answered == 3


def test_a_question_waits_until_the_worker_starts() -> None:
    kiosk = Kiosk()
    kiosk.ask("a", "early")
    assert summaries_so_far(kiosk, "a") == [("queued", 1)]
    kiosk.scheduler.start(kiosk.generator)
    try:
        assert kiosk.messages("a") == [("queued", 1), *_answer("early")]
    finally:
        assert kiosk.scheduler.drain(grace_s=WAIT_S)


def summaries_so_far(kiosk: Kiosk, request_id: str) -> list[tuple[object, ...]]:
    bodies = kiosk.connection.stream(request_id)
    assert [b["seq"] for b in bodies] == list(range(len(bodies)))
    return [("queued", b["position"]) if b["type"] == "queued" else (b["type"],) for b in bodies]


def test_cancel_of_the_running_answer_ends_it_with_the_text_so_far(kiosk: Kiosk) -> None:
    kiosk.generator.hold("long")
    kiosk.ask("a", "long")
    kiosk.generator.wait_started("long")
    assert kiosk.scheduler.cancel("a")
    assert kiosk.messages("a") == [("chunk", "answer "), ("done", "cancelled", "answer ")]
    kiosk.wait_idle()
    assert not kiosk.scheduler.cancel("a"), "an ended id is unknown"
    counters = kiosk.scheduler.counters
    assert (counters.cancelled, counters.answered, counters.errors) == (1, 0, 0)


def test_cancel_of_a_queued_question_ends_it_without_the_model(kiosk: Kiosk) -> None:
    kiosk.generator.hold("long")
    kiosk.ask("a", "long")
    kiosk.generator.wait_started("long")
    kiosk.ask("b", "waiting")
    kiosk.ask("c", "after")
    assert kiosk.scheduler.cancel("b")
    # Ended at once, on the canceller's thread, while "long" still runs.
    assert summaries(kiosk.connection.stream("b")) == [("queued", 1), ("done", "cancelled", "")]
    assert not kiosk.scheduler.cancel("b")
    assert not kiosk.scheduler.cancel("nobody")
    kiosk.generator.release("long")
    assert kiosk.messages("c") == [("queued", 2), *_answer("after")]
    assert kiosk.messages("a") == _answer("long")
    assert kiosk.generator.started == ["long", "after"]
    kiosk.wait_idle()
    assert kiosk.scheduler.counters.cancelled == 1


def test_a_queued_question_past_its_deadline_ends_while_another_runs(kiosk: Kiosk) -> None:
    kiosk.generator.hold("long")
    kiosk.ask("a", "long")
    kiosk.generator.wait_started("long")
    kiosk.ask("b", "hurried", deadline_s=0.05)
    kiosk.ask("c", "patient")
    assert kiosk.messages("b") == [("queued", 1), ("done", "deadline", "")]
    assert kiosk.connection.stream("a")[-1]["type"] == "chunk", "the running answer goes on"
    kiosk.generator.release("long")
    assert kiosk.messages("a") == _answer("long")
    assert kiosk.messages("c") == [("queued", 2), *_answer("patient")]
    assert kiosk.generator.started == ["long", "patient"]
    kiosk.wait_idle()
    assert kiosk.scheduler.counters.rejected == 1


def test_a_deadline_no_longer_applies_once_the_answer_has_started(kiosk: Kiosk) -> None:
    kiosk.generator.hold("long")
    job = kiosk.ask("a", "long", deadline_s=0.05)
    kiosk.generator.wait_started("long")
    deadline = job.deadline_monotonic
    assert deadline is not None
    # Not synchronisation: the deadline has to pass in real time before the answer may go on.
    threading.Event().wait(max(0.0, deadline - time.monotonic()) + 0.02)
    kiosk.generator.release("long")
    assert kiosk.messages("a") == _answer("long")


def test_a_full_queue_refuses_with_busy_and_a_retry_time() -> None:
    kiosk = Kiosk(capacity=1)
    kiosk.scheduler.start(kiosk.generator)
    try:
        kiosk.generator.hold("long")
        kiosk.ask("a", "long")
        kiosk.generator.wait_started("long")
        kiosk.ask("b", "fits")
        kiosk.ask("c", "too many")
        assert summaries(kiosk.connection.stream("c")) == [("error", "busy")]
        assert kiosk.connection.stream("c")[0]["retry_after_s"] >= 1.0
        kiosk.generator.release("long")
        assert kiosk.messages("a") == _answer("long")
        assert kiosk.messages("b") == [("queued", 1), *_answer("fits")]
        assert kiosk.generator.started == ["long", "fits"]
        kiosk.wait_idle()
        assert kiosk.scheduler.counters.rejected == 1
    finally:
        kiosk.generator.release_all()
        assert kiosk.scheduler.drain(grace_s=WAIT_S)


def test_an_overheated_kiosk_refuses_new_questions_until_it_has_cooled(kiosk: Kiosk) -> None:
    kiosk.scheduler.set_overheated(30.0)
    kiosk.ask("a", "hot")
    assert summaries(kiosk.connection.stream("a")) == [("error", "overheated")]
    assert kiosk.connection.stream("a")[0]["retry_after_s"] == 30.0
    kiosk.scheduler.set_overheated(None)
    kiosk.ask("b", "cool")
    assert kiosk.messages("b") == _answer("cool")


def test_drain_lets_the_running_answer_finish_and_ends_the_queued_ones(kiosk: Kiosk) -> None:
    kiosk.generator.hold("long")
    kiosk.ask("a", "long")
    kiosk.generator.wait_started("long")
    kiosk.ask("b", "queued")
    stopped: list[bool] = []
    drainer = threading.Thread(target=lambda: stopped.append(kiosk.scheduler.drain(WAIT_S)))
    drainer.start()
    assert kiosk.messages("b") == [("queued", 1), ("error", "shutting_down")]
    kiosk.ask("c", "too late")
    assert summaries(kiosk.connection.stream("c")) == [("error", "shutting_down")]
    kiosk.generator.release("long")
    drainer.join(WAIT_S)
    assert stopped == [True]
    assert kiosk.messages("a") == _answer("long")
    assert kiosk.generator.started == ["long"]
    counters = kiosk.scheduler.counters
    assert (counters.answered, counters.rejected, counters.errors) == (1, 2, 0)


def test_drain_cuts_short_an_answer_that_outlasts_the_grace(kiosk: Kiosk) -> None:
    kiosk.generator.hold("endless")
    kiosk.ask("a", "endless")
    kiosk.generator.wait_started("endless")
    assert kiosk.scheduler.drain(grace_s=0.01)
    assert kiosk.messages("a") == [("chunk", "answer "), ("error", "shutting_down")]
    assert kiosk.connection.stream("a")[-1]["message"] == (
        "kioskd is shutting down; the answer was cut short"
    )
    assert kiosk.scheduler.counters.errors == 1


def test_a_model_failure_ends_the_answer_with_an_error_and_the_worker_goes_on(
    kiosk: Kiosk,
) -> None:
    kiosk.generator.fail("broken", RuntimeError("out of memory"), after_words=1)
    kiosk.generator.fail(
        "invalid", RequestError(ErrorCode.INVALID_REQUEST, "question: too long for the model")
    )
    kiosk.ask("a", "broken")
    kiosk.ask("b", "invalid")
    kiosk.ask("c", "fine")
    assert kiosk.messages("a")[-2:] == [("chunk", "answer "), ("error", "model_error")]
    assert kiosk.connection.stream("a")[-1]["message"] == "the model failed: out of memory"
    assert kiosk.messages("b")[-1:] == [("error", "invalid_request")]
    assert kiosk.messages("c")[-1] == _answer("fine")[-1]
    kiosk.wait_idle()
    counters = kiosk.scheduler.counters
    assert (counters.errors, counters.answered) == (2, 1)


def test_gathered_text_goes_out_before_the_terminal_message() -> None:
    # A flush interval no test outlasts: after the first text, chunks wait for the end.
    kiosk = Kiosk(flush_ms=600_000)
    kiosk.generator.fail("broken here", RuntimeError("decode failed"), after_words=3)
    kiosk.scheduler.start(kiosk.generator)
    try:
        kiosk.ask("a", "fine words")
        kiosk.ask("b", "broken here")
        assert kiosk.messages("a") == [
            ("chunk", "answer "),
            ("chunk", "to fine words "),
            ("done", "stop", "answer to fine words "),
        ]
        assert kiosk.messages("b") == [
            ("queued", 1),
            ("chunk", "answer "),
            ("chunk", "to broken "),
            ("error", "model_error"),
        ]
    finally:
        assert kiosk.scheduler.drain(grace_s=WAIT_S)
