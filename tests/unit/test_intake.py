"""Intake with a recording connection and a fake Generator: where each question's replies go."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest

from daemon.config import Config, LimitsConfig
from daemon.intake import Intake
from daemon.ledger import PacketLedger, RecentAnswers
from daemon.packets import Inbound
from daemon.scheduler import Scheduler
from daemon.topics import Topics
from tests.unit.fakes import WAIT_S, Acked, FakeGenerator, RecordingConnection, summary

ASK = "kiosk/k1/ask"
ERRORS = "kiosk/k1/error"


class Desk:
    """An intake for kiosk/k1, its scheduler started with a fake generator."""

    def __init__(self, *, limits: LimitsConfig | None = None) -> None:
        self.generator = FakeGenerator()
        self.connection = RecordingConnection()
        self.scheduler = Scheduler(capacity=4)
        self.scheduler.start(self.generator)
        self.others: list[Inbound] = []
        self.intake = Intake(
            Config(limits=limits or LimitsConfig()),
            Topics("kiosk/k1"),
            self.scheduler,
            self.connection,
            packets=PacketLedger(max_ids=100),
            answers=RecentAnswers(dedup_s=60.0, max_ids=100),
            device="k1",
            reply_prefixes=("kiosk/k1/answer/", "app/replies/"),
        )

    def ask(
        self,
        payload: bytes | Mapping[str, object],
        *,
        mid: int,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        retain: bool = False,
        dup: bool = False,
        topic: str = ASK,
    ) -> None:
        """A QoS 1 message as the broker hands it over, its PUBACK held back."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        message = Inbound(
            topic,
            body,
            response_topic=response_topic,
            correlation_data=correlation_data,
            retain=retain,
            qos=1,
            mid=mid,
            dup=dup,
        )
        self.intake.dispatch(message, self.others.append)

    def wait_acked(self, mid: int, times: int = 1) -> None:
        self.connection.wait_for(lambda: self.connection.events.count(Acked(mid)) >= times)

    def events(self) -> list[tuple[object, ...]]:
        """Publishes (topic and what they say) and acknowledgements, in the order they came."""
        return [
            ("ack", e.mid) if isinstance(e, Acked) else (e.topic, *summary(e.body))
            for e in self.connection.events
        ]


@pytest.fixture
def desk() -> Iterator[Desk]:
    desk = Desk()
    yield desk
    desk.generator.release_all()
    assert desk.scheduler.drain(grace_s=WAIT_S)


def _answer(topic: str, question: str) -> list[tuple[object, ...]]:
    words = [f"{word} " for word in f"answer to {question}".split()]
    return [(topic, "chunk", word) for word in words] + [(topic, "done", "stop", "".join(words))]


def test_a_question_is_answered_on_its_topic_and_acknowledged_after_its_done(desk: Desk) -> None:
    desk.ask({"id": "r1", "question": "hello"}, mid=1)
    desk.wait_acked(1)
    assert desk.events() == [*_answer("kiosk/k1/answer/r1", "hello"), ("ack", 1)]
    done = desk.connection.published()[-1].body
    assert (done["id"], done["seq"], done["device"]) == ("r1", 3, "k1")


def test_a_plain_text_question_is_answered_under_a_generated_id(desk: Desk) -> None:
    desk.ask(b"hello there", mid=1)
    desk.wait_acked(1)
    request_id = desk.connection.published()[0].body["id"]
    assert desk.events() == [*_answer(f"kiosk/k1/answer/{request_id}", "hello there"), ("ack", 1)]


def test_invalid_json_without_an_id_is_refused_on_the_error_topic(desk: Desk) -> None:
    desk.ask(b'{"id": "r1", "question": ', mid=1)
    assert desk.events() == [(ERRORS, "error", "invalid_json"), ("ack", 1)]
    assert desk.connection.published()[0].body["id"] is None
    assert desk.generator.started == []
    assert desk.scheduler.counters.errors == 1


def test_an_invalid_request_with_its_id_is_refused_on_its_answer_topic(desk: Desk) -> None:
    desk.ask({"id": "r2", "question": "q", "max_tokens": 0}, mid=1)
    assert desk.events() == [("kiosk/k1/answer/r2", "error", "invalid_request"), ("ack", 1)]
    error = desk.connection.published()[0].body
    assert (error["id"], error["seq"], error["message"]) == (
        "r2",
        0,
        "max_tokens: must be a whole number >= 1",
    )


def test_an_error_goes_to_an_allowed_response_topic_with_its_correlation_data(
    desk: Desk,
) -> None:
    desk.ask({"question": 7}, mid=1, response_topic="app/replies/t1", correlation_data=b"c1")
    assert desk.events() == [("app/replies/t1", "error", "invalid_request"), ("ack", 1)]
    assert desk.connection.published()[0].correlation_data == b"c1"


def test_a_forbidden_reply_topic_is_refused_where_the_sender_can_read_it(desk: Desk) -> None:
    desk.ask({"id": "r3", "question": "q"}, mid=1, response_topic="elsewhere/t1")
    assert desk.events() == [
        ("kiosk/k1/answer/r3", "error", "forbidden_reply_topic"),
        ("ack", 1),
    ]
    assert desk.generator.started == []


def test_an_oversized_payload_is_refused_unread_on_the_error_topic() -> None:
    desk = Desk(limits=LimitsConfig(max_payload_bytes=64))
    try:
        desk.ask({"id": "r4", "question": "x" * 100}, mid=1, response_topic="app/replies/t1")
        assert desk.events() == [(ERRORS, "error", "too_large"), ("ack", 1)]
        assert desk.generator.started == []
    finally:
        assert desk.scheduler.drain(grace_s=WAIT_S)


def test_a_second_question_under_a_running_id_is_refused_apart_from_its_stream(
    desk: Desk,
) -> None:
    desk.generator.hold("long")
    desk.ask({"id": "r1", "question": "long"}, mid=1)
    desk.connection.wait_for(lambda: len(desk.connection.published()) == 1)
    desk.ask({"id": "r1", "question": "other"}, mid=2)
    refusal = desk.connection.published()[-1].body
    assert "seq" not in refusal, "never to be read as a message of r1's stream"
    desk.generator.release("long")
    desk.wait_acked(1)
    topic = "kiosk/k1/answer/r1"
    first, *rest = _answer(topic, "long")
    assert desk.events() == [
        first,
        (ERRORS, "error", "duplicate_id"),
        ("ack", 2),
        *rest,
        ("ack", 1),
    ]
    assert desk.generator.started == ["long"]
    assert desk.scheduler.counters.rejected == 1


def test_a_retry_of_an_answered_id_gets_the_same_done_again(desk: Desk) -> None:
    desk.ask({"id": "r1", "question": "hello"}, mid=1)
    desk.wait_acked(1)
    desk.ask({"id": "r1", "question": "hello"}, mid=2)
    topic = "kiosk/k1/answer/r1"
    assert desk.events() == [
        *_answer(topic, "hello"),
        ("ack", 1),
        (topic, "done", "stop", "answer to hello "),
        ("ack", 2),
    ]
    first_done, replayed = [
        p.payload for p in desk.connection.published() if b'"done"' in p.payload
    ]
    assert replayed == first_done
    assert desk.generator.started == ["hello"]


def test_a_reused_id_with_a_new_question_is_answered_anew(desk: Desk) -> None:
    desk.ask({"id": "r1", "question": "hello"}, mid=1)
    desk.wait_acked(1)
    desk.ask({"id": "r1", "question": "goodbye"}, mid=2)
    desk.wait_acked(2)
    topic = "kiosk/k1/answer/r1"
    assert desk.events() == [
        *_answer(topic, "hello"),
        ("ack", 1),
        *_answer(topic, "goodbye"),
        ("ack", 2),
    ]
    assert desk.generator.started == ["hello", "goodbye"]


def test_a_retained_question_is_refused_and_never_answered(desk: Desk) -> None:
    desk.ask({"id": "r1", "question": "hello"}, mid=1, retain=True)
    assert desk.events() == [("kiosk/k1/answer/r1", "error", "invalid_request"), ("ack", 1)]
    assert desk.connection.published()[0].body["message"].startswith("retain: ")
    assert desk.generator.started == []


def test_a_redelivered_question_is_not_answered_twice(desk: Desk) -> None:
    question = {"id": "r1", "question": "long"}
    desk.generator.hold("long")
    desk.ask(question, mid=7)
    desk.connection.wait_for(lambda: len(desk.connection.published()) == 1)
    desk.ask(question, mid=7, dup=True)  # still in hand: neither answered nor acknowledged
    desk.generator.release("long")
    desk.wait_acked(7)
    desk.ask(question, mid=7, dup=True)  # our PUBACK was lost: acknowledged again, no answer
    assert desk.events() == [*_answer("kiosk/k1/answer/r1", "long"), ("ack", 7), ("ack", 7)]
    assert desk.generator.started == ["long"]


def test_a_sender_over_its_rate_is_refused_busy() -> None:
    desk = Desk(limits=LimitsConfig(max_requests_per_s=0.01))
    try:
        desk.ask({"id": "r1", "question": "hello"}, mid=1)
        desk.ask({"id": "r2", "question": "again"}, mid=2)
        desk.wait_acked(1)
        assert ("kiosk/k1/answer/r2", "error", "busy") in desk.events()
        assert desk.connection.stream("r2")[0]["retry_after_s"] > 1.0
        assert desk.generator.started == ["hello"]
    finally:
        assert desk.scheduler.drain(grace_s=WAIT_S)


def test_other_topics_go_to_their_handler_and_are_acknowledged(desk: Desk) -> None:
    desk.ask(b'{"id": "r1"}', mid=5, topic="kiosk/k1/cancel")
    assert [m.topic for m in desk.others] == ["kiosk/k1/cancel"]
    assert desk.events() == [("ack", 5)]
