"""A request's `stop` and `format` at the edge (docs/protocol.md, "Stop strings and JSON answers"),
and the grammars and checks that a format becomes (daemon/grammar.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.grammar import FormatError, JsonValue, answer_format, json_complete
from daemon.messages import Done, ErrorCode, RequestError, Timing, Usage
from daemon.validation import parse_request

LIMITS = {"max_payload_bytes": 65536, "max_question_chars": 2000, "max_schema_bytes": 8192}

ALARM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high"]},
        "stop_line": {"type": "boolean"},
        "temperature_c": {"type": "number"},
        "location": {
            "type": "object",
            "properties": {"line": {"type": "integer"}, "station": {"type": "string"}},
            "required": ["line", "station"],
        },
    },
    "required": ["severity", "stop_line", "temperature_c", "location"],
}


def _request(**fields: Any) -> bytes:
    return json.dumps({"id": "q1", "question": "Classify.", **fields}).encode()


def _refusal(**fields: Any) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(_request(**fields), **LIMITS)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert caught.value.request_id == "q1"
    return caught.value.message


@pytest.mark.parametrize(
    "stop", [[], ["a"] * 5, [""], ["x" * 65], "END", [1], [None], {"a": 1}, True]
)
def test_a_bad_stop_is_refused_naming_the_field(stop: Any) -> None:
    assert _refusal(stop=stop).startswith("stop: must be a list of 1-4 strings")


def test_stop_strings_are_taken_as_given() -> None:
    request = parse_request(_request(stop=["\n\n", "x" * 64, "END", "Q:"]), **LIMITS)
    assert request.stop == ("\n\n", "x" * 64, "END", "Q:")
    assert parse_request(_request(), **LIMITS).stop == ()


def test_json_format_is_any_object() -> None:
    request = parse_request(_request(format="json"), **LIMITS)
    assert request.answer_format is not None
    assert "root ::= object" in request.answer_format.grammar
    assert request.answer_format.check('{"a": [1, 2]}') == (JsonValue({"a": [1, 2]}), None)
    value, error = request.answer_format.check("[1, 2]")
    assert value is None
    assert error is not None
    assert "is not of type 'object'" in error


def test_a_schema_becomes_a_grammar_in_the_schemas_property_order() -> None:
    fmt = answer_format({"type": "json_schema", "schema": ALARM_SCHEMA}, max_schema_bytes=8192)
    root = next(line for line in fmt.grammar.splitlines() if line.startswith("root ::="))
    order = [root.index(name.replace("_", "-") + "-kv") for name in ALARM_SCHEMA["properties"]]
    assert order == sorted(order)
    assert '"\\"low\\"" | "\\"medium\\"" | "\\"high\\""' in fmt.grammar
    # A raw line break inside a JSON string is invalid JSON: the grammar leaves it out.
    char = next(line for line in fmt.grammar.splitlines() if line.startswith("char ::="))
    assert "\\x00-\\x1F" in char


def test_the_answer_is_checked_against_the_schema() -> None:
    fmt = answer_format({"type": "json_schema", "schema": ALARM_SCHEMA}, max_schema_bytes=8192)
    good = {
        "severity": "high",
        "stop_line": True,
        "temperature_c": 95.5,
        "location": {"line": 2, "station": "press 3"},
    }
    assert fmt.check(json.dumps(good)) == (JsonValue(good), None)
    value, error = fmt.check(json.dumps({**good, "location": {"line": "two", "station": "x"}}))
    assert value is None
    assert error == "location/line: 'two' is not of type 'integer'"
    value, error = fmt.check('{"severity": "high", ')
    assert value is None
    assert error is not None
    assert error.startswith("the answer is not complete JSON")


def test_grammars_are_cached_by_schema() -> None:
    first = answer_format({"type": "json_schema", "schema": ALARM_SCHEMA}, max_schema_bytes=8192)
    again = answer_format(
        {"type": "json_schema", "schema": json.loads(json.dumps(ALARM_SCHEMA))},
        max_schema_bytes=8192,
    )
    assert again is first
    reordered = dict(reversed(list(ALARM_SCHEMA.items())))
    other = answer_format({"type": "json_schema", "schema": reordered}, max_schema_bytes=8192)
    assert other.digest != first.digest


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("yaml", 'must be "json" or'),
        ({"type": "json"}, 'must be "json" or'),
        ({"type": "json_schema"}, "schema: must be a JSON object"),
        ({"type": "json_schema", "schema": []}, "schema: must be a JSON object"),
        ({"type": "json_schema", "schema": {"type": "frobnicate"}}, "not a valid JSON schema"),
        ({"type": "json_schema", "schema": {"type": 5}}, "not a valid JSON schema"),
        (
            {"type": "json_schema", "schema": {"type": "string", "pattern": "[a-z]+"}},
            "cannot be enforced",
        ),
        (
            {"type": "json_schema", "schema": {"$ref": "https://example.com/schema.json"}},
            "cannot be enforced",
        ),
        ({"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "cannot be enforced"),
        (
            {"type": "json_schema", "schema": {"type": "array", "minItems": 100000}},
            "minItems 100000 is more than",
        ),
        ({"type": "json_schema", "schema": {"enum": ["\ud800"]}}, "unpaired UTF-16 surrogate"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_naming_format(value: Any, reason: str) -> None:
    message = _refusal(format=value)
    assert message.startswith("format: ")
    assert reason in message


def test_a_schema_over_the_limit_is_refused() -> None:
    huge = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string"} for i in range(400)},
    }
    message = _refusal(format={"type": "json_schema", "schema": huge})
    assert message.startswith("format: schema: ")
    assert "at most 8192 are accepted" in message
    small = {"type": "json_schema", "schema": {"type": "object"}}
    with pytest.raises(FormatError, match="at most 10 are accepted"):
        answer_format(small, max_schema_bytes=10)


def test_json_is_complete_only_when_nothing_could_extend_it() -> None:
    assert json_complete('{"a": {"b": 1}}')
    assert json_complete(' ["x"] ')
    assert not json_complete('{"a": {"b": 1}')
    assert not json_complete('{"a": "}"')
    assert not json_complete("12")  # a number could still grow: its grammar ends it
    assert not json_complete("")


def test_done_carries_json_and_json_error() -> None:
    timing = Timing(0.0, 1.0, 2.0, 3.0)
    done = Done('{"a": null}', "stop", Usage(1, 2), timing, json=JsonValue({"a": None}))
    body = json.loads(done.to_payload("q1", 3))
    assert body["json"] == {"a": None}
    assert "json_error" not in body
    refused = Done("[]", "stop", Usage(1, 2), timing, json_error="the answer: [] is not ...")
    body = json.loads(refused.to_payload("q1", 3))
    assert "json" not in body
    assert body["json_error"] == "the answer: [] is not ..."
    plain = json.loads(Done("x", "stop", Usage(1, 2), timing).to_payload("q1", 3))
    assert "json" not in plain
    assert "json_error" not in plain


def test_a_tiny_done_leaves_out_the_json_after_the_text() -> None:
    done = Done('{"a": 1}', "stop", Usage(1, 2), Timing(0, 1, 2, 3), json=JsonValue({"a": 1}))
    smaller = [json.loads(m.to_payload("q1", 3)) for m in done.smaller()]
    assert "text" not in smaller[0]
    assert smaller[0]["json"] == {"a": 1}
    assert smaller[1]["json_omitted"] is True
    assert "json" not in smaller[1]
    assert "timing" in smaller[1]
