"""Answers that end (docs/protocol.md, "Stop strings and JSON answers"), against the real broker,
daemon and embedded model, and a chat-template model that ends its own turn."""

from __future__ import annotations

import json
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from daemon import exitcodes, testhooks
from daemon.bench.synth import scripted_qwen2
from daemon.engine import Engine
from daemon.framing import STOPS
from daemon.grammar import answer_format
from daemon.llamacpp import lib
from daemon.sampling import GrammarMode
from daemon.vocabindex import Candidates, VocabIndex
from tests.support.daemon import REPO, Broker, Daemon, DaemonFactory
from tests.support.engines import small_settings
from tests.support.mqtt_client import TestClient, assert_well_formed

QUESTIONS = [
    line
    for line in (REPO / "tests" / "data" / "factory-questions.txt").read_text().splitlines()
    if line and not line.startswith("#")
]
QWEN_TEMPLATE = json.loads(
    (REPO / "tests" / "data" / "qwen2.5-instruct-chat-template.json").read_text()
)["chat_template"]

ALARM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high"]},
        "stop_line": {"type": "boolean"},
        "temperature_c": {"type": "number"},
        "location": {
            "type": "object",
            # maxLength bounds the whole answer, so even a sampled one ends within max_tokens.
            "properties": {
                "line": {"type": "integer"},
                "station": {"type": "string", "maxLength": 20},
            },
            "required": ["line", "station"],
        },
    },
    "required": ["severity", "stop_line", "temperature_c", "location"],
}
ALARM = "Classify this alarm: hydraulic press 3 on line 2 reports oil at 95 C."


def _ask(client: TestClient, daemon: Daemon, request_id: str, **fields: Any) -> list[Any]:
    """The whole well-formed stream of one question."""
    topic = daemon.topic(f"answer/{request_id}")
    client.subscribe(topic)
    client.publish(daemon.topic("ask"), {"id": request_id, **fields})
    messages = client.stream(topic, timeout_s=120)
    assert_well_formed(messages, request_id)
    return messages


def _chunks(messages: list[Any]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "chunk"]


def test_a_stop_string_split_across_tokens_never_reaches_a_chunk(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    question = {"question": "What does a torque wrench do?", "temperature": 0}
    free = _ask(client, daemon, "free", **question)
    text, pieces = free[-1]["text"], _chunks(free)
    assert text == text.lstrip(), "an answer's leading white space is not part of it"
    # A stop string made of the end of one token's text and the start of the next one's.
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    boundary = next(
        start
        for start, before, after in zip(starts[1:], pieces, pieces[1:], strict=False)
        if len(before) >= 2 and len(after) >= 2 and text.find(before[-2:] + after[:2]) == start - 2
    )
    stop = text[boundary - 2 : boundary + 2]

    cut = _ask(client, daemon, "cut", stop=["never-in-it", stop], **question)
    done = cut[-1]
    assert done["finish_reason"] == "stop"
    assert done["text"] == text[: boundary - 2]
    # Chunks only ever grow the text, so any part of the stop string sent would show here.
    assert "".join(_chunks(cut)) == done["text"]
    assert done["usage"]["completion_tokens"] < free[-1]["usage"]["completion_tokens"]


def test_json_answers_parse_and_meet_their_schema(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    question = 'Give the status of press 3 as a JSON object with "running" and "temperature_c".'
    any_json = _ask(client, daemon, "json", question=question, format="json", temperature=0)
    done = any_json[-1]
    assert done["finish_reason"] == "stop"
    assert isinstance(done["json"], dict)
    assert json.loads(done["text"]) == done["json"]
    assert "json_error" not in done

    schema_format = {"type": "json_schema", "schema": ALARM_SCHEMA}
    for request_id, temperature in (("schema-greedy", 0.0), ("schema-sampled", 0.7)):
        done = _ask(
            client,
            daemon,
            request_id,
            question=ALARM,
            format=schema_format,
            temperature=temperature,
        )[-1]
        assert done["finish_reason"] == "stop", done
        jsonschema.validate(done["json"], ALARM_SCHEMA)
        assert json.loads(done["text"]) == done["json"]

    # Cut by max_tokens inside the JSON: no json, and no json_error either (it is not complete).
    short = _ask(client, daemon, "short", question=ALARM, format=schema_format, max_tokens=5)
    done = short[-1]
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 5
    assert done["text"].startswith("{")
    assert "json" not in done
    assert "json_error" not in done


def test_schemas_that_cannot_be_enforced_are_refused(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    # 10 KB, over the default limits.max_schema_bytes (8192), well under the payload limit.
    huge = {
        "type": "object",
        "properties": {f"reading_{i}": {"type": "number"} for i in range(400)},
    }
    bad = {"type": "string", "pattern": "[0-9]+"}  # the converter needs ^...$
    for request_id, schema, reason in (
        ("huge", huge, "at most 8192 are accepted"),
        ("bad", bad, "cannot be enforced"),
        ("invalid", {"type": "colour"}, "not a valid JSON schema"),
    ):
        messages = _ask(
            client,
            daemon,
            request_id,
            question="Readings?",
            format={"type": "json_schema", "schema": schema},
        )
        assert len(messages) == 1
        error = messages[0]
        assert error["type"] == "error"
        assert error["code"] == "invalid_request"
        assert error["message"].startswith("format: ")
        assert reason in error["message"]


def test_factory_questions_end_by_themselves(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()  # default settings: completion frame, temperature 0.7
    assert len(QUESTIONS) >= 20
    ended = []
    for number, question in enumerate(QUESTIONS):
        done = _ask(client, daemon, f"q{number}", question=question)[-1]
        assert not any(stop in done["text"] for stop in STOPS)
        ended.append(done["finish_reason"] == "stop" and done["usage"]["completion_tokens"] <= 120)
    assert sum(ended) >= 0.9 * len(QUESTIONS), f"{sum(ended)} of {len(QUESTIONS)} ended"


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwen2 model with Qwen2.5-Instruct's real chat template that answers "OK." and ends
    its turn with <|im_end|>."""
    path = tmp_path_factory.mktemp("scripted") / "scripted-qwen2.gguf"
    scripted_qwen2(path, "OK.", template=QWEN_TEMPLATE)
    return path


def test_a_template_model_stops_on_its_end_of_turn_token(
    start_daemon: DaemonFactory, client: TestClient, scripted_model: Path
) -> None:
    daemon = start_daemon({"model": {"path": str(scripted_model), "max_tokens": 16}})
    done = _ask(client, daemon, "eot", question="Is the line running?")[-1]
    assert done["text"] == "OK."
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 3  # "O", "K", "." and then <|im_end|>
    # Stop strings work on the chat path too.
    done = _ask(client, daemon, "stopped", question="Is it?", stop=["K."])[-1]
    assert (done["text"], done["finish_reason"]) == ("O", "stop")


def test_the_chat_path_renders_qwens_real_template_unchanged(scripted_model: Path) -> None:
    engine = Engine(small_settings(scripted_model, system_prompt="Be brief."))
    try:
        assert engine.prompt_text("Hi") == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        # model.stop applies to every answer, besides a request's own.
        stopping = Engine(small_settings(scripted_model, system_prompt="Be brief.", stop=(".",)))
        try:
            answer = stopping.generate(
                "Hi",
                max_tokens=8,
                temperature=0,
                on_text=lambda _t: None,
                should_stop=lambda: False,
            )
            assert answer.text == "OK"
        finally:
            stopping.close()
    finally:
        engine.close()


def test_checking_the_likeliest_tokens_chooses_as_the_whole_vocabulary_mask(
    model_path: Path,
) -> None:
    """Greedy JSON answers are the same token for token, whichever way the grammar is applied
    (daemon/sampling.py): the shortcuts change the cost, not the answer."""
    settings = small_settings(model_path, ctx=1024, max_tokens=48)
    engine = Engine(settings, testhooks.TestHooks(ignore_eos=True))
    fmt = answer_format({"type": "json_schema", "schema": ALARM_SCHEMA}, max_schema_bytes=8192)
    answers = {}
    try:
        for mode in GrammarMode:
            engine.grammar_mode = mode
            answers[mode] = engine.generate(
                ALARM,
                max_tokens=48,
                temperature=0.0,
                on_text=lambda _t: None,
                should_stop=lambda: False,
                answer_format=fmt,
            ).text
            unmasked, masked = engine.grammar_counts
            if mode is GrammarMode.MASKED:
                assert unmasked == 0
            else:
                assert unmasked > 0, f"{mode}: the shortcut was never taken"
            if mode is GrammarMode.CANDIDATES:
                assert masked < unmasked / 4
    finally:
        engine.close()
    assert answers[GrammarMode.CANDIDATES] == answers[GrammarMode.MASKED]
    assert answers[GrammarMode.SAMPLED] == answers[GrammarMode.MASKED]


def test_the_vocabulary_groups_hold_every_token_the_grammar_allows(model_path: Path) -> None:
    """daemon/vocabindex.py, token by token through a JSON answer on the embedded model: the
    groups it finds hold every token the whole-vocabulary mask allows, and stand in for the
    whole vocabulary wherever the grammar allows few tokens."""
    settings = small_settings(model_path)
    engine = Engine(settings)
    fmt = answer_format({"type": "json_schema", "schema": ALARM_SCHEMA}, max_schema_bytes=8192)
    answer = '{"severity": "high", "stop_line": true, "temperature_c": -12.5, '
    answer += '"location": {"line": 3, "station": "Press 4 \u00e9t\u00e9"}}'
    vocab = engine.vocab
    grammar = lib.llama_sampler_init_grammar(vocab, fmt.grammar.encode(), b"root")
    whole = Candidates(lib.llama_vocab_n_tokens(vocab))
    whole.fill(array("i", range(lib.llama_vocab_n_tokens(vocab))), None)
    steps = 0
    try:
        index = VocabIndex(vocab)
        for token in engine.tokenize(answer, special=False):
            allowed = {whole.data[i].id for i in whole.apply(grammar)}
            found = index.candidates(grammar, 16384)
            assert token in allowed
            if len(allowed) < 1000:  # around the values: the groups stand in for the vocabulary
                assert found is not None
                steps += 1
            if found is not None:
                assert allowed <= set(found)
            whole.fill(array("i", range(lib.llama_vocab_n_tokens(vocab))), None)
            lib.llama_sampler_accept(grammar, token)
    finally:
        lib.llama_sampler_free(grammar)
        engine.close()
    assert steps >= 20


def test_kioskd_ask_json_schema_prints_json_and_fails_without_it(
    start_daemon: DaemonFactory, broker: Broker, tmp_path: Path
) -> None:
    daemon = start_daemon()
    schema_file = tmp_path / "alarm.schema.json"
    schema_file.write_text(json.dumps(ALARM_SCHEMA))
    ask = [sys.executable, "-m", "daemon", "ask", ALARM, "--port", str(broker.port)]
    ask += ["--prefix", daemon.prefix, "--json-schema", str(schema_file)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ask, *extra], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
        )

    answered = run("--stop", "never\\nthere")
    assert answered.returncode == exitcodes.OK, answered.stderr
    jsonschema.validate(json.loads(answered.stdout), ALARM_SCHEMA)
    cut = run("--max-tokens", "3")
    assert cut.returncode == exitcodes.FAILURE
    assert "the answer is not the JSON asked for: finish_reason length" in cut.stderr
    missing = run("--json-schema", str(tmp_path / "none.json"))
    assert missing.returncode == exitcodes.FAILURE
    assert "--json-schema: cannot read" in missing.stderr
