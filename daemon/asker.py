"""Client side of the protocol, for `kioskd ask`, `kioskd status` and the benchmarks."""

from __future__ import annotations

import json
import queue
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from daemon.broker import Connection
from daemon.messages import new_request_id
from daemon.topics import Topics

# A terminal user waits this long for the broker before being told why it is not there: paho's
# own connect timeout (5 s) plus its failure probe could otherwise take 10 s and more.
CONNECT_TIMEOUT_S = 6.0
# Retained messages follow the SUBACK at once; this allows a slow link's round trip or two.
RETAINED_WAIT_S = 2.0
# How long an abandoned question's cancel may take to reach the broker (its PUBACK).
CANCEL_ACK_WAIT_S = 2.0


class Reason(StrEnum):
    """Why a client could not get as far as a kiosk."""

    BROKER_UNREACHABLE = "broker_unreachable"
    BROKER_REFUSED = "broker_refused"
    NO_KIOSK = "no_kiosk"
    KIOSK_OFFLINE = "kiosk_offline"


class UnavailableError(Exception):
    """The broker or the kiosk is not there; the message names which and why, for a person."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Login:
    """How to connect besides host and port (as the kiosk's own mqtt.* config does)."""

    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    protocol: str = "5"


@dataclass
class Answer:
    """Everything received for one question; `final` is the terminal message, if any came."""

    request_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals_monotonic: list[float] = field(default_factory=list)
    final: dict[str, Any] | None = None
    sent_monotonic: float = 0.0
    first_chunk_monotonic: float | None = None
    # Whether the broker acknowledged the P/cancel sent for an abandoned question (None: none sent).
    cancel_acknowledged: bool | None = None


# What paho's thread hands the caller's thread, in arrival order: ("connected", None),
# ("problem", text or None) or ("message", Inbound).
_Event = tuple[str, Any, float]


class _Session:
    """One client connection whose callbacks all land, in order, on a queue the caller reads."""

    def __init__(
        self, *, host: str, port: int, client_id: str, subscriptions: list[str], login: Login
    ) -> None:
        self.where = f"{host}:{port}"
        self.events: queue.Queue[_Event] = queue.Queue()
        self.problem: str | None = None
        self.connection = Connection(
            host=host,
            port=port,
            client_id=client_id,
            protocol=login.protocol,
            subscriptions=subscriptions,
            on_message=lambda message: self._put("message", message),
            on_connected=lambda: self._put("connected", None),
            on_problem=lambda problem: self._put("problem", problem),
            username=login.username,
            password=login.password,
            tls_context=login.tls_context,
        )

    def _put(self, kind: str, value: Any) -> None:
        self.events.put((kind, value, time.monotonic()))

    def open(self, timeout_s: float) -> None:
        """Connect; raise UnavailableError once the broker is known to be missing or to refuse."""
        self.connection.start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                kind, value, _ = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                cause = f": {self.problem}" if self.problem else " (is it running? is it MQTT?)"
                raise UnavailableError(
                    Reason.BROKER_UNREACHABLE,
                    f"no MQTT connection to broker {self.where} within {timeout_s:g} s{cause}",
                ) from None
            if kind == "connected":
                return
            if kind == "problem":
                self.note_problem(value)

    def next_event(self, deadline: float) -> _Event | None:
        """The next event before `deadline` (None: none came); refusals raise UnavailableError."""
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if event[0] == "problem":
                self.note_problem(event[1])
                continue
            return event

    def note_problem(self, problem: str | None) -> None:
        """Raise for a problem the broker.Connection diagnosed; it would only retry forever."""
        self.problem = problem
        if problem is None:
            return
        refused = any(
            words in problem
            for words in ("refused the connection", "refused the subscription", "before accepting")
        )
        reason = Reason.BROKER_REFUSED if refused else Reason.BROKER_UNREACHABLE
        raise UnavailableError(reason, problem)

    def close(self) -> None:
        self.connection.stop()


def _kiosk_status(session: _Session, topics: Topics, wait_s: float) -> None:
    """Read the kiosk's retained P/status; raise UnavailableError unless it says `online`."""
    deadline = time.monotonic() + wait_s
    while (event := session.next_event(deadline)) is not None:
        kind, message, _ = event
        if kind == "message" and message.topic == topics.status:
            status = message.payload.decode("utf-8", "replace")
            if status == "online":
                return
            message_text = offline_message(topics, session.where, status)
            raise UnavailableError(Reason.KIOSK_OFFLINE, message_text)
    raise UnavailableError(Reason.NO_KIOSK, no_kiosk_message(topics, session.where))


def no_kiosk_message(topics: Topics, where: str) -> str:
    return (
        f"no kiosk at prefix {topics.prefix} on broker {where}: nothing is retained on "
        f"{topics.status} (check --prefix, or the kiosk's mqtt.topic_prefix)"
    )


def offline_message(topics: Topics, where: str, status: str) -> str:
    if status == "offline":
        return f"the kiosk at {topics.prefix} on broker {where} is offline"
    return f"the kiosk at {topics.prefix} on broker {where} is not online ({status!r})"


def ask(
    question: str,
    *,
    host: str,
    port: int,
    prefix: str,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout_s: float = 120.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    stream: bool = True,
    max_message_bytes: int | None = None,
    stop: list[str] | None = None,
    answer_format: str | dict[str, Any] | None = None,
    check_status: bool = False,
    login: Login | None = None,
    into: Answer | None = None,
    conversation_id: str | None = None,
) -> Answer:
    """Publish `question` to P/ask and collect its stream until the terminal message.

    Raises UnavailableError when the broker cannot be reached or refuses us, and, with
    `check_status`, when the kiosk's retained P/status is missing or not `online`. With
    `conversation_id`, the question is the next turn of that conversation. A question
    left unanswered (timeout, or an exception such as KeyboardInterrupt or BrokenPipeError from
    `on_message`) is cancelled on P/cancel before this returns or raises. Pass `into` to keep
    what arrived (and whether the cancel was acknowledged) when this raises.
    """
    topics = Topics(prefix)
    answer = into or Answer(new_request_id())
    subscriptions = [topics.answer(answer.request_id)]
    if check_status:
        subscriptions.append(topics.status)
    session = _Session(
        host=host,
        port=port,
        client_id=f"kioskd-ask-{answer.request_id}",
        subscriptions=subscriptions,
        login=login or Login(),
    )
    try:
        session.open(min(timeout_s, CONNECT_TIMEOUT_S))
        if check_status:
            _kiosk_status(session, topics, min(timeout_s, RETAINED_WAIT_S))
        request: dict[str, Any] = {"id": answer.request_id, "question": question}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if temperature is not None:
            request["temperature"] = temperature
        if not stream:
            request["stream"] = False
        if max_message_bytes is not None:
            request["max_message_bytes"] = max_message_bytes
        if stop:
            request["stop"] = stop
        if answer_format is not None:
            request["format"] = answer_format
        if conversation_id is not None:
            request["conversation_id"] = conversation_id
        answer.sent_monotonic = time.monotonic()
        # The SUBSCRIBE went out first on this connection, so the broker routes the reply to us.
        session.connection.publish(topics.ask, json.dumps(request).encode("utf-8"))
        try:
            _collect(session, topics, answer, answer.sent_monotonic + timeout_s, on_message)
        except BaseException:
            _cancel(session, topics, answer)
            raise
        if answer.final is None:
            _cancel(session, topics, answer)
        return answer
    finally:
        session.close()


def _collect(
    session: _Session,
    topics: Topics,
    answer: Answer,
    deadline: float,
    on_message: Callable[[dict[str, Any]], None] | None,
) -> None:
    reply_topic = topics.answer(answer.request_id)
    while answer.final is None and (event := session.next_event(deadline)) is not None:
        kind, inbound, arrived = event
        if kind != "message" or inbound.topic != reply_topic:
            continue  # the kiosk's status may change while it answers; its stream says the rest
        try:
            message = json.loads(inbound.payload)
        except ValueError:
            continue  # not from a kiosk: every reply is a JSON object
        if not isinstance(message, dict) or message.get("code") == "duplicate_id":
            continue  # a duplicate_id refusal never ends the request it names (docs/protocol.md)
        answer.messages.append(message)
        answer.arrivals_monotonic.append(arrived)
        if message.get("type") == "chunk" and answer.first_chunk_monotonic is None:
            answer.first_chunk_monotonic = arrived
        if on_message is not None:
            on_message(message)
        if message.get("type") in ("done", "error"):
            answer.final = message


def _cancel(session: _Session, topics: Topics, answer: Answer) -> None:
    """Tell the kiosk to stop a question nobody waits for any more (docs/protocol.md, Cancel)."""
    payload = json.dumps({"id": answer.request_id}).encode("utf-8")
    answer.cancel_acknowledged = False
    answer.cancel_acknowledged = session.connection.publish(topics.cancel, payload).wait(
        CANCEL_ACK_WAIT_S
    )


@dataclass(frozen=True)
class Retained:
    """The retained messages found, and when they were read (for their age)."""

    payloads: dict[str, bytes]
    read_at: float


def read_retained(
    topics: list[str],
    *,
    host: str,
    port: int,
    timeout_s: float = RETAINED_WAIT_S,
    login: Login | None = None,
) -> Retained:
    """The retained message of each topic that has one (they arrive right after SUBACK).

    Raises UnavailableError when the broker cannot be reached or refuses us.
    """
    session = _Session(
        host=host,
        port=port,
        client_id=f"kioskd-status-{new_request_id()}",
        subscriptions=topics,
        login=login or Login(),
    )
    found: dict[str, bytes] = {}
    try:
        session.open(CONNECT_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while not all(topic in found for topic in topics):
            event = session.next_event(deadline)
            if event is None:
                break
            kind, message, _ = event
            if kind == "message" and message.retain:
                found[message.topic] = message.payload
        return Retained(found, time.time())
    finally:
        session.close()
