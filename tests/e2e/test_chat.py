"""`kioskd chat` on a real pseudo-terminal, and `kioskd ask --conversation`, against the real
broker, daemon and embedded model."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from daemon import exitcodes
from tests.e2e.test_cli import kioskd, target
from tests.support.daemon import Broker, DaemonFactory
from tests.support.mqtt_client import TestClient
from tests.support.terminal import Terminal

KIOSKD = [sys.executable, "-m", "daemon"]


def _dones(watcher: TestClient, prefix: str, count: int) -> list[dict[str, Any]]:
    """The first `count` terminal messages of the kiosk's answers, in arrival order."""

    def terminal(got: list[Any]) -> list[dict[str, Any]]:
        return [
            r.json()
            for r in got
            if r.topic.startswith(f"{prefix}/answer/") and r.json()["type"] in ("done", "error")
        ]

    return terminal(watcher.wait_for(lambda got: len(terminal(got)) >= count, 60))[:count]


def _at_prompt(terminal: Terminal, prompts: int) -> None:
    """Wait until chat shows its prompt for the `prompts`-th time and waits there."""
    deadline = time.monotonic() + 30
    while not (terminal.output().count("> ") >= prompts and terminal.output().endswith("> ")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no prompt {prompts}; got {terminal.output()}")
        time.sleep(0.05)


def test_chat_streams_answers_remembers_turns_stops_on_ctrl_c_and_quits_on_ctrl_d(
    start_daemon: DaemonFactory,
    broker: Broker,
    prefix: str,
    slow_tokens: dict[str, str],
) -> None:
    start_daemon({"model": {"max_tokens": 30}}, env=slow_tokens)
    watcher = TestClient(broker.port)
    watcher.subscribe(f"{prefix}/answer/+")
    # A terminal as a person has one: $TERM set, so that readline edits the line.
    terminal = Terminal(
        [*KIOSKD, "chat", *target(broker.port, prefix)], env={**os.environ, "TERM": "xterm"}
    )
    try:
        terminal.wait_output("Ctrl-D quits")
        _at_prompt(terminal, 1)
        terminal.type(b"What is a PLC?\r")
        first = _dones(watcher, prefix, 1)[0]
        _at_prompt(terminal, 2)
        terminal.type(b"And a relay?\r")
        second = _dones(watcher, prefix, 2)[1]
        _at_prompt(terminal, 3)
        # Ctrl-C while the third answer streams: the turn stops and is not remembered.
        terminal.type(b"Tell me more.\r")
        earlier = {first["id"], second["id"]}
        watcher.wait_for(
            lambda got: any(
                r.json()["type"] == "chunk" and r.json()["id"] not in earlier for r in got
            )
        )
        terminal.type(b"\x03")
        terminal.wait_output("[stopped; this turn is not remembered]")
        stopped = _dones(watcher, prefix, 3)[2]
        _at_prompt(terminal, 4)
        terminal.type(b"Tell me more.\r")
        fourth = _dones(watcher, prefix, 4)[3]
        _at_prompt(terminal, 5)
        terminal.type(b"\x04")
        rc = terminal.wait(15)
    finally:
        terminal.close()
        watcher.close()
    shown = terminal.output()
    assert rc == exitcodes.OK, shown
    assert "Traceback" not in shown
    conversation = first["conversation"]["id"]
    assert len(conversation) >= 16, "an unguessable id"
    assert f"continue later with: kioskd chat --conversation {conversation}" in shown
    assert [d["conversation"]["turn"] for d in (first, second, stopped, fourth)] == [1, 2, 3, 3]
    assert {d["conversation"]["id"] for d in (first, second, stopped, fourth)} == {conversation}
    assert stopped["finish_reason"] == "cancelled"
    assert fourth["usage"]["cached_tokens"] >= 0.9 * second["usage"]["prompt_tokens"]
    for done in (first, second, fourth):
        assert done["text"] in shown.replace("\r\n", "\n"), "each answer is shown as it came"


def test_ask_continues_a_conversation(
    start_daemon: DaemonFactory, broker: Broker, prefix: str
) -> None:
    start_daemon({"model": {"max_tokens": 8}})
    turns = []
    for question in ("What is a fuse?", "Where is it?"):
        result = kioskd(
            "ask", question, "--conversation", "desk-4", "--json", *target(broker.port, prefix)
        )
        assert result.returncode == exitcodes.OK, result.stderr
        turns.append(json.loads(result.stdout.splitlines()[-1])["conversation"])
    assert [(t["turn"], t["new"]) for t in turns] == [(1, True), (2, False)]
    refused = kioskd("ask", "x", "--conversation", "no/slashes", *target(broker.port, prefix))
    assert refused.returncode == 2
    assert "a conversation id is 1-64 characters" in refused.stderr
