"""Client side of the protocol, for `kioskd ask` and the benchmarks: one question, one stream."""

from __future__ import annotations

import contextlib
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.broker import Connection, Inbound
from daemon.messages import new_request_id
from daemon.topics import Topics


@dataclass
class Answer:
    """Everything received for one question; `final` is the terminal message, if any came."""

    request_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals_monotonic: list[float] = field(default_factory=list)
    final: dict[str, Any] | None = None
    sent_monotonic: float = 0.0
    first_chunk_monotonic: float | None = None


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
) -> Answer:
    """Publish `question` to P/ask and collect its stream until the terminal message."""
    topics = Topics(prefix)
    answer = Answer(new_request_id())
    inbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
    subscribed = queue.Queue[None]()

    def received(message: Inbound) -> None:
        inbox.put((time.monotonic(), message.payload))

    connection = Connection(
        host=host,
        port=port,
        client_id=f"kioskd-ask-{answer.request_id}",
        subscriptions=[topics.answer(answer.request_id)],
        on_message=received,
        on_connected=lambda: subscribed.put(None),
    )
    connection.start()
    try:
        deadline = time.monotonic() + timeout_s
        try:
            subscribed.get(timeout=timeout_s)
        except queue.Empty:
            return answer
        request: dict[str, Any] = {"id": answer.request_id, "question": question}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if temperature is not None:
            request["temperature"] = temperature
        answer.sent_monotonic = time.monotonic()
        # The SUBSCRIBE went out first on this connection, so the broker routes the reply to us.
        connection.publish(topics.ask, json.dumps(request).encode("utf-8"))
        while answer.final is None:
            try:
                arrived, payload = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            message = json.loads(payload)
            answer.messages.append(message)
            answer.arrivals_monotonic.append(arrived)
            if message.get("type") == "chunk" and answer.first_chunk_monotonic is None:
                answer.first_chunk_monotonic = arrived
            if on_message is not None:
                on_message(message)
            if message.get("type") in ("done", "error"):
                answer.final = message
        return answer
    finally:
        connection.stop()


def read_retained(
    topics: list[str], *, host: str, port: int, timeout_s: float = 5.0
) -> dict[str, bytes]:
    """The retained message of each topic (those that have one arrive right after SUBACK)."""
    found: dict[str, bytes] = {}
    complete = queue.Queue[None]()

    def received(message: Inbound) -> None:
        found[message.topic] = message.payload
        if all(topic in found for topic in topics):
            complete.put(None)

    connection = Connection(
        host=host,
        port=port,
        client_id=f"kioskd-status-{new_request_id()}",
        subscriptions=topics,
        on_message=received,
    )
    connection.start()
    try:
        with contextlib.suppress(queue.Empty):
            complete.get(timeout=timeout_s)
        return dict(found)
    finally:
        connection.stop()
