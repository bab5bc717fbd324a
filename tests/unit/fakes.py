"""Recording fakes of kioskd's own seams, for unit tests of the Scheduler and Intake.

FakeGenerator meets daemon.generation.Generator: it answers without a model, and the test holds
a generation at a gate to arrange "running" and "queued". RecordingConnection meets
daemon.outlet.IntakeConnection: it keeps every publish and acknowledgement in order, and reports
each QoS 1 message delivered at once, as a broker that always answers would. Neither touches
paho or a broker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.generation import Generation
from daemon.grammar import AnswerFormat
from daemon.packets import JSON, Inbound, publish_packet_bytes

# Long enough never to pass on a loaded machine; a test that waits this long has failed.
WAIT_S = 10.0


@dataclass(frozen=True)
class Sent:
    """A publish the recorder took; `refused` as daemon.outlet.Sent asks."""

    refused: bool = False


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    correlation_data: bytes | None

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.payload)
        return body


@dataclass(frozen=True)
class Acked:
    mid: int


class RecordingConnection:
    """An IntakeConnection that records; `max_packet_bytes` plays the broker's limit."""

    def __init__(self, *, max_packet_bytes: int | None = None) -> None:
        self.events: list[Published | Acked] = []
        self._max_packet_bytes = max_packet_bytes
        self._cond = threading.Condition()

    @property
    def max_packet_bytes(self) -> int | None:
        return self._max_packet_bytes

    def packet_bytes(
        self,
        topic: str,
        payload_bytes: int,
        *,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> int:
        return publish_packet_bytes(
            topic, payload_bytes, correlation_data=correlation_data, content_type=content_type
        )

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> Sent:
        assert content_type == JSON
        with self._cond:
            self.events.append(Published(topic, payload, correlation_data))
            self._cond.notify_all()
        if on_delivered is not None:
            on_delivered()
        return Sent()

    def acknowledge(self, message: Inbound) -> None:
        with self._cond:
            self.events.append(Acked(message.mid))
            self._cond.notify_all()

    # --- for the test's assertions ------------------------------------------------------

    def published(self, topic: str | None = None) -> list[Published]:
        with self._cond:
            return [
                e
                for e in self.events
                if isinstance(e, Published) and (topic is None or e.topic == topic)
            ]

    def stream(self, request_id: str) -> list[dict[str, Any]]:
        """The bodies published for `request_id`, in order, on whatever topic."""
        return [p.body for p in self.published() if p.body.get("id") == request_id]

    def wait_for(self, condition: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(condition, WAIT_S), self.events

    def wait_terminal(self, request_id: str) -> None:
        """Until `request_id` has a terminal message (the test asserts how many)."""
        self.wait_for(lambda: any(_terminal(b) for b in self.stream(request_id)))


def _terminal(body: dict[str, Any]) -> bool:
    return body.get("type") in ("done", "error")


def summary(body: dict[str, Any]) -> tuple[object, ...]:
    """What a stream message says, without its timing (which no test can know)."""
    kind = body["type"]
    if kind == "queued":
        return ("queued", body["position"])
    if kind == "chunk":
        return ("chunk", body["text"])
    if kind == "done":
        return ("done", body["finish_reason"], body.get("text"))
    return ("error", body["code"])


def summaries(bodies: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """The messages of one stream, checked to be numbered 0, 1, ... with one terminal, last."""
    assert [b["seq"] for b in bodies] == list(range(len(bodies))), bodies
    assert [_terminal(b) for b in bodies].count(True) == 1, bodies
    assert _terminal(bodies[-1]), bodies
    return [summary(b) for b in bodies]


class FakeGenerator:
    """Answers each question with its words, one `on_text` each, as a model streams tokens.

    `hold(question)` makes that question's generation stop after its first word and wait at a
    gate (checking should_stop as the engine does after each token) until `release(question)`;
    `fail(question, exc)` makes it raise, after that many words.
    """

    def __init__(self) -> None:
        self.started: list[str] = []
        self._cond = threading.Condition()
        self._gates: dict[str, threading.Event] = {}
        self._failures: dict[str, tuple[Exception, int]] = {}

    def hold(self, question: str) -> None:
        self._gates[question] = threading.Event()

    def release(self, question: str) -> None:
        self._gates[question].set()

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def fail(self, question: str, exc: Exception, *, after_words: int = 0) -> None:
        self._failures[question] = (exc, after_words)

    def wait_started(self, question: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: question in self.started, WAIT_S), self.started

    def generate(
        self,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
        stop: Sequence[str] = (),
        answer_format: AnswerFormat | None = None,
        conversation_id: str | None = None,
    ) -> Generation:
        words = [f"{word} " for word in f"answer to {question}".split()]
        first_token = time.monotonic()
        with self._cond:
            self.started.append(question)
            self._cond.notify_all()
        written: list[str] = []
        stopped = False
        for index, word in enumerate(words):
            if should_stop():
                stopped = True
                break
            failure = self._failures.get(question)
            if failure is not None and index == failure[1]:
                raise failure[0]
            on_text(word)
            written.append(word)
            gate = self._gates.get(question)
            if gate is not None and index == 0 and self._held(gate, should_stop):
                stopped = True
                break
        return Generation(
            text="".join(written),
            stopped=stopped,
            hit_length=False,
            prompt_tokens=len(question.split()),
            completion_tokens=len(written),
            first_token_monotonic=first_token,
            end_monotonic=time.monotonic(),
        )

    @staticmethod
    def _held(gate: threading.Event, should_stop: Callable[[], bool]) -> bool:
        """Wait at `gate`; True when should_stop ended the wait instead."""
        # The engine asks should_stop once per token; a short wait stands in for a token.
        while not gate.wait(0.002):
            if should_stop():
                return True
        return False
