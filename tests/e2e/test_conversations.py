"""docs/protocol.md "Conversations" and "Prompt reuse", end to end: real mosquitto, real
daemon, real embedded model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.bench.conversation import run_many
from daemon.bench.synth import tiny_qwen2
from tests.support.daemon import DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed

# Answers of a known length: end-of-turn is ignored.
FIXED_LENGTH = {"KIOSKD_TEST_IGNORE_EOS": "1"}


class Asker:
    """Asks one kiosk questions and returns their terminal messages."""

    def __init__(self, client: TestClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.count = 0
        client.subscribe(f"{prefix}/answer/+")

    def send(self, question: str, conversation: str | None = None, **fields: Any) -> str:
        self.count += 1
        request_id = f"r{self.count}"
        body = {"id": request_id, "question": question, "temperature": 0, **fields}
        if conversation is not None:
            body["conversation_id"] = conversation
        self.client.publish(f"{self.prefix}/ask", body)
        return request_id

    def done(self, request_id: str) -> dict[str, Any]:
        final = assert_well_formed(
            self.client.stream(f"{self.prefix}/answer/{request_id}"), request_id
        )
        assert final["type"] == "done", final
        return final

    def ask(self, question: str, conversation: str | None = None, **fields: Any) -> dict[str, Any]:
        return self.done(self.send(question, conversation, **fields))

    def forget(self, conversation: str) -> None:
        self.client.publish(f"{self.prefix}/forget", {"conversation_id": conversation})


def _conversation_dir(daemon_log_path: Path) -> Path:
    # conftest sets XDG_DATA_HOME to the test's tmp_path/data.
    return daemon_log_path.parent / "data" / "kioskd" / "conversations"


def _wait(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


def _health(client: TestClient, topic: str, predicate: Any) -> dict[str, Any]:
    client.subscribe(topic)

    def matching() -> list[dict[str, Any]]:
        return [r.json() for r in client.on_topic(topic) if predicate(r.json())]

    client.wait_for(lambda _received: bool(matching()), 20)
    return matching()[-1]


def test_follow_ups_carry_their_history_and_reuse_its_model_state(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(
        {"model": {"max_tokens": 24}, "telemetry": {"interval_s": 0.5}}, env=FIXED_LENGTH
    )
    kiosk = Asker(client, daemon.prefix)
    question = "What does a PLC do on a packaging line?"
    first = kiosk.ask(question, "line-3")
    assert first["conversation"] == {
        "id": "line-3",
        "turn": 1,
        "context_tokens": 0,
        "dropped_turns": 0,
        "new": True,
    }
    # The same question again: the prompt grows by exactly the first question and answer.
    second = kiosk.ask(question, "line-3")
    context = second["conversation"]["context_tokens"]
    assert second["conversation"]["turn"] == 2
    assert not second["conversation"]["new"]
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + context
    assert context > first["usage"]["completion_tokens"]
    # Back to back, the model state of the first turn is still in the cache.
    assert second["usage"]["cached_tokens"] >= 0.9 * first["usage"]["prompt_tokens"]

    # Another question and another conversation run in between ...
    plain = kiosk.ask("Name a colour.")
    assert "conversation" not in plain
    assert plain["usage"]["cached_tokens"] > 0, "the system prompt's state is reused"
    other = kiosk.ask("How do I clear a jam?", "press-7")
    assert other["conversation"]["new"]
    # ... and the follow-up gets its saved state back instead of reading it all again.
    third = kiosk.ask("And if the light stays red?", "line-3")
    assert third["conversation"]["turn"] == 3
    assert third["usage"]["cached_tokens"] >= 0.9 * second["usage"]["prompt_tokens"]

    health = _health(client, daemon.topic("health"), lambda h: h["conversations"]["active"] == 2)
    assert health["conversations"]["state_mb"] > 0

    # P/forget drops it at once, files and all; the next turn starts afresh.
    files = _conversation_dir(daemon.log_path)
    kiosk.ask("Name a tool.")  # kioskd goes idle after it, and saves
    _wait(lambda: (files / "line-3.json").exists() and (files / "line-3.state").exists())
    kiosk.forget("line-3")
    _wait(lambda: not list(files.glob("line-3.*")))
    again = kiosk.ask(question, "line-3")
    assert again["conversation"] == first["conversation"]
    assert again["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    kiosk.forget("never-was")  # ignored
    assert kiosk.ask("Still there?", "press-7")["conversation"]["turn"] == 2

    # A tiny device's done always keeps its conversation block: too small a limit is refused.
    conversation = "Vb3kQ9x2LmT7pR4sNw8YzA"
    refused = kiosk.send("Hi?", conversation, max_message_bytes=256)
    error = assert_well_formed(client.stream(daemon.topic(f"answer/{refused}")), refused)
    assert error["code"] == "too_large"
    tiny = kiosk.ask("Hi?", conversation, max_message_bytes=320)
    assert tiny["conversation"]["new"]


def test_turns_are_answered_in_arrival_order_and_unfinished_ones_are_not_remembered(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 12}}, env=slow_tokens)
    kiosk = Asker(client, daemon.prefix)
    first = kiosk.send("First question?", "c")
    second = kiosk.send("Second question?", "c")
    second_stream = client.stream(daemon.topic(f"answer/{second}"))
    assert second_stream[0]["type"] == "queued", "it waits for the earlier turn"
    done_first, done_second = kiosk.done(first), kiosk.done(second)
    assert done_second["conversation"]["turn"] == 2
    assert done_second["conversation"]["context_tokens"] > 0, "it saw the first turn"
    arrivals = {
        r.json()["id"]: r.arrived_monotonic
        for r in client.received
        if r.json().get("type") == "done"
    }
    assert arrivals[first] < arrivals[second]
    assert done_first["conversation"]["turn"] == 1

    # A turn cancelled while it runs is not remembered: the next one has its number.
    running = kiosk.send("Third question?", "c")
    client.wait_for(lambda got: any(r.topic.endswith(f"/{running}") for r in got))
    queued = kiosk.send("Queued question?", "c")
    client.wait_for(lambda got: any(r.topic.endswith(f"/{queued}") for r in got))
    client.publish(daemon.topic("cancel"), {"id": queued})
    client.publish(daemon.topic("cancel"), {"id": running})
    for request_id in (queued, running):
        cancelled = kiosk.done(request_id)
        assert cancelled["finish_reason"] == "cancelled"
        assert cancelled["conversation"]["turn"] == 3
        assert not cancelled["conversation"]["new"]
    again = kiosk.ask("Third question?", "c")
    assert again["conversation"]["turn"] == 3
    running_done = kiosk.done(running)
    assert again["usage"]["prompt_tokens"] == running_done["usage"]["prompt_tokens"]
    assert (
        again["conversation"]["context_tokens"] == (running_done["conversation"]["context_tokens"])
    )


def test_the_budget_drops_whole_turns_and_the_oldest_conversation_goes(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    budget = 120
    daemon = start_daemon(
        {
            "model": {"max_tokens": 16},
            "conversations": {"max_context_tokens": budget, "max_active": 2},
        },
        env=FIXED_LENGTH,
    )
    kiosk = Asker(client, daemon.prefix)
    question = "Which gloves for the press?"
    alone = kiosk.ask(question, "long")["usage"]["prompt_tokens"]
    dropped = []
    for _turn in range(6):
        done = kiosk.ask(question, "long")
        info = done["conversation"]
        assert done["usage"]["prompt_tokens"] <= budget
        assert info["context_tokens"] <= budget
        assert done["usage"]["prompt_tokens"] == alone + info["context_tokens"]
        dropped.append(info["dropped_turns"])
    assert dropped == sorted(dropped), "dropped turns stay dropped"
    assert dropped[-1] > 0
    assert kiosk.ask(question, "long")["conversation"]["turn"] == 8

    # max_active 2: a third conversation pushes out the least recently used one.
    kiosk.ask("Hi?", "b")
    kiosk.ask("Hi?", "c")
    assert kiosk.ask("Again?", "long")["conversation"]["new"]
    assert not kiosk.ask("Again?", "c")["conversation"]["new"]


def test_conversations_expire_after_their_time_to_live(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 4}, "conversations": {"ttl_s": 1.5}})
    kiosk = Asker(client, daemon.prefix)
    kiosk.ask("Hello?", "brief")
    files = _conversation_dir(daemon.log_path)
    _wait((files / "brief.json").exists)
    # The saver deletes the expired files without being asked to.
    _wait(lambda: not list(files.iterdir()), timeout_s=10)
    assert kiosk.ask("Hello again?", "brief")["conversation"]["new"]


@pytest.mark.slow
def test_conversations_survive_a_restart_and_a_foreign_or_damaged_state_falls_back_to_text(
    start_daemon: DaemonFactory, client: TestClient, tmp_path: Path
) -> None:
    config: dict[str, Any] = {"model": {"max_tokens": 16}}
    daemon = start_daemon(config, env=FIXED_LENGTH)
    kiosk = Asker(client, daemon.prefix)
    first = kiosk.ask("What is lockout-tagout?", "kept")
    kiosk.ask("What is a torque wrench?", "damaged")
    assert daemon.terminate() == 0
    files = _conversation_dir(daemon.log_path)
    assert {p.name for p in files.iterdir()} == {
        "kept.json",
        "kept.state",
        "damaged.json",
        "damaged.state",
    }
    damaged = files / "damaged.state"
    damaged.write_bytes(damaged.read_bytes()[:1000])

    daemon = start_daemon(config, env=FIXED_LENGTH)
    second = kiosk.ask("Why?", "kept")
    assert second["conversation"]["turn"] == 2
    assert not second["conversation"]["new"]
    # The state saved before the restart is restored, not the history read again.
    assert second["usage"]["cached_tokens"] >= 0.9 * first["usage"]["prompt_tokens"]
    fallback = kiosk.ask("Why?", "damaged")
    assert fallback["conversation"]["turn"] == 2
    assert fallback["conversation"]["context_tokens"] > 0
    # Read again: nothing of its history is reused, only the fixed start every prompt shares
    # (the completion frame's instructions and examples are most of a short prompt).
    usage = fallback["usage"]
    assert (
        usage["cached_tokens"]
        <= usage["prompt_tokens"] - fallback["conversation"]["context_tokens"]
    )
    assert "its saved model state is truncated" in daemon.log()
    assert daemon.terminate() == 0

    # Another model: the saved state is useless to it, and its history is read as text.
    other_model = tmp_path / "tiny-qwen2.gguf"
    tiny_qwen2(other_model)
    daemon = start_daemon({**config, "model": {"max_tokens": 16, "path": str(other_model)}})
    third = kiosk.ask("And then?", "kept")
    assert third["conversation"]["turn"] == 3
    assert third["conversation"]["context_tokens"] > 0
    assert "belongs to another setup (model file, chat template changed)" in daemon.log()
    assert json.loads((files / "kept.json").read_text())["turns"] >= 2


@pytest.mark.slow
def test_many_conversations_keep_memory_and_disk_within_max_state_mb(model_path: Path) -> None:
    # kioskd bench conversation's second part, smaller: 24 conversations of 3 turns, 8 at a
    # time, through one daemon whose state budget holds only a few of them.
    result = run_many(conversations=24, threads=1, model=model_path, max_state_mb=4, max_active=8)
    assert result.turns == 72
    assert result.rss_growth_mib <= 4 + 30
    # State files within the budget; the text files beside them are about 1 KiB each.
    assert result.files_peak_mib <= 4 + 8 * 4 / 1024
    assert result.files_after_shutdown_mib > 0, "conversations were saved"
