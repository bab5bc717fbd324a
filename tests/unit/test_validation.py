"""Malformed requests: each gets the protocol's error where the client can see it."""

from __future__ import annotations

import json

import pytest

from daemon.messages import ErrorCode, RequestError
from daemon.validation import parse_cancel, parse_request

LIMITS = {"max_payload_bytes": 4096, "max_question_chars": 200}

# (name, payload, code, where the error goes: an answer id, or None for P/error)
MALFORMED: list[tuple[str, bytes, ErrorCode, str | None]] = [
    ("truncated json", b'{"id": "m1", "question": "hi"', ErrorCode.INVALID_JSON, None),
    ("trailing garbage", b'{"id": "m2", "question": "hi"} x', ErrorCode.INVALID_JSON, None),
    ("single quotes", b"{'id': 'm3'}", ErrorCode.INVALID_JSON, None),
    ("invalid utf-8", b'{"id": "m4", "question": "\xff\xfe"}', ErrorCode.BAD_ENCODING, None),
    ("invalid utf-8 text", b"caf\xe9?", ErrorCode.BAD_ENCODING, None),
    ("lone surrogate", b'{"id": "m6", "question": "a\\ud800b"}', ErrorCode.BAD_ENCODING, "m6"),
    ("too large", b'{"id": "m7", "question": "' + b"a" * 5000 + b'"}', ErrorCode.TOO_LARGE, None),
    ("missing question", b'{"id": "m8"}', ErrorCode.INVALID_REQUEST, "m8"),
    ("empty question", b'{"id": "m9", "question": "   "}', ErrorCode.INVALID_REQUEST, "m9"),
    ("question not a string", b'{"id": "m10", "question": 42}', ErrorCode.INVALID_REQUEST, "m10"),
    (
        "question too long",
        b'{"id": "m11", "question": "' + b"b" * 300 + b'"}',
        ErrorCode.INVALID_REQUEST,
        "m11",
    ),
    ("id with slash", b'{"id": "a/b", "question": "hi"}', ErrorCode.INVALID_REQUEST, None),
    ("id with wildcard", b'{"id": "#", "question": "hi"}', ErrorCode.INVALID_REQUEST, None),
    (
        "id too long",
        json.dumps({"id": "x" * 65, "question": "hi"}).encode(),
        ErrorCode.INVALID_REQUEST,
        None,
    ),
    ("id not a string", b'{"id": 7, "question": "hi"}', ErrorCode.INVALID_REQUEST, None),
    (
        "max_tokens zero",
        b'{"id": "m16", "question": "hi", "max_tokens": 0}',
        ErrorCode.INVALID_REQUEST,
        "m16",
    ),
    (
        "max_tokens float",
        b'{"id": "m17", "question": "hi", "max_tokens": 2.5}',
        ErrorCode.INVALID_REQUEST,
        "m17",
    ),
    (
        "max_tokens bool",
        b'{"id": "m18", "question": "hi", "max_tokens": true}',
        ErrorCode.INVALID_REQUEST,
        "m18",
    ),
    (
        "temperature too high",
        b'{"id": "m19", "question": "hi", "temperature": 2.5}',
        ErrorCode.INVALID_REQUEST,
        "m19",
    ),
    (
        "temperature string",
        b'{"id": "m20", "question": "hi", "temperature": "hot"}',
        ErrorCode.INVALID_REQUEST,
        "m20",
    ),
    (
        "deadline negative",
        b'{"id": "m21", "question": "hi", "deadline_s": -1}',
        ErrorCode.INVALID_REQUEST,
        "m21",
    ),
    (
        "huge number",
        b'{"id": "m22", "question": "hi", "deadline_s": 1e999}',
        ErrorCode.INVALID_REQUEST,
        "m22",
    ),
    (
        "huge integer",
        b'{"id": "m23", "question": "hi", "temperature": ' + b"9" * 400 + b"}",
        ErrorCode.INVALID_REQUEST,
        "m23",
    ),
    (
        "duplicate keys",
        b'{"id": "m24", "question": "a", "question": "b"}',
        ErrorCode.INVALID_JSON,
        None,
    ),
    (
        "deep nesting",
        b'{"id": "m25", "x": ' + b"[" * 40 + b"]" * 40 + b', "question": "q"}',
        ErrorCode.INVALID_JSON,
        None,
    ),
    ("empty payload", b"", ErrorCode.INVALID_REQUEST, None),
    ("null byte", b'{"id": "m27", "question": "a\\u0000b"}', ErrorCode.INVALID_REQUEST, "m27"),
    (
        "escape sequence",
        b'{"id": "m28", "question": "\\u001b[2Jhi"}',
        ErrorCode.INVALID_REQUEST,
        "m28",
    ),
    ("raw NUL in text", b"what\x00is this", ErrorCode.INVALID_REQUEST, None),
    (
        "C1 control",
        '{"id": "m30", "question": "a\u0085b"}'.encode(),
        ErrorCode.INVALID_REQUEST,
        "m30",
    ),
]


@pytest.mark.parametrize(
    ("name", "payload", "code", "request_id"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_parser_codes(name: str, payload: bytes, code: ErrorCode, request_id: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(payload, **LIMITS)
    assert caught.value.code is code
    assert caught.value.request_id == request_id
    assert caught.value.message


def test_parser_accepts_and_clamps_nothing_itself() -> None:
    request = parse_request(
        b'{"id": "ok.1_-", "question": " hi ", "max_tokens": 9999, "temperature": 0,'
        b' "deadline_s": 3, "unknown": {"nested": [1]}}',
        **LIMITS,
    )
    assert (request.id, request.question, request.max_tokens) == ("ok.1_-", "hi", 9999)
    assert (request.temperature, request.deadline_s) == (0.0, 3.0)


def test_tabs_and_line_breaks_are_fine() -> None:
    question = parse_request(b'{"question": "line 1\\n\\tline 2\\r\\n"}', **LIMITS).question
    assert question == "line 1\n\tline 2"


def test_parse_cancel() -> None:
    assert parse_cancel(b'{"id": "abc"}') == "abc"
    assert parse_cancel(b"abc") == "abc", "the bare id as plain text (docs/protocol.md v2)"
    assert parse_cancel(b" q-1.x\n") == "q-1.x"
    assert parse_cancel(b'\xef\xbb\xbf{"id": "bom"}') == "bom"
    for payload in (b"a/b", b"two words", b'{"id": "a/b"}', b"\xff", b"[]", b'{"id": 3}', b""):
        assert parse_cancel(payload) is None
