"""The incoming payloads of docs/protocol.md, validated once at the edge.

`P/ask` becomes a `Request` of daemon/messages.py or a `RequestError` with the protocol's code;
`P/cancel` and `P/forget` yield an id or nothing. The messages themselves stay in messages.py.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from daemon.grammar import FormatError, answer_format
from daemon.messages import ID_PATTERN, ID_RULE, ErrorCode, Request, RequestError, new_request_id

# C0 controls (but tab, newline, carriage return), DEL and C1 controls: never part of a question.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MAX_JSON_DEPTH = 32
# docs/protocol.md "Tiny devices": a request's max_message_bytes; 192 leaves a done room for its id.
MIN_MESSAGE_BYTES = 192
MAX_MESSAGE_BYTES = 65536
# docs/protocol.md "Stop strings and JSON answers": 1-4 stop strings of 1-64 characters.
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_SCHEMA_BYTES = 8192


def parse_request(
    payload: bytes,
    *,
    max_payload_bytes: int,
    max_question_chars: int,
    max_schema_bytes: int = DEFAULT_MAX_SCHEMA_BYTES,
) -> Request:
    """Validate a `P/ask` payload, raising RequestError with the protocol's code."""
    if len(payload) > max_payload_bytes:
        raise RequestError(
            ErrorCode.TOO_LARGE,
            f"payload is {len(payload)} bytes; at most {max_payload_bytes} are accepted",
        )
    text = _decode(payload)
    if not text.lstrip().startswith("{"):
        return Request(
            id=new_request_id(),
            question=_question(text, max_question_chars, None),
            id_chosen=False,
        )
    try:
        fields = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise RequestError(ErrorCode.INVALID_JSON, str(exc)) from exc
    except RecursionError as exc:
        raise RequestError(ErrorCode.INVALID_JSON, "JSON is nested too deeply") from exc
    except ValueError as exc:
        raise RequestError(ErrorCode.INVALID_JSON, f"payload is not valid JSON: {exc}") from exc
    # The C decoder stops at Python's recursion limit (caught above), so this walk is bounded.
    if _json_depth(fields) > MAX_JSON_DEPTH:
        raise RequestError(
            ErrorCode.INVALID_JSON, f"JSON is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    if not isinstance(fields, dict):
        raise RequestError(
            ErrorCode.INVALID_JSON, "a payload starting with '{' must be a JSON object"
        )
    return _request_from_fields(fields, max_question_chars, max_schema_bytes)


def _decode(payload: bytes) -> str:
    """UTF-8 text of a payload; a leading byte order mark (Windows tools add one) is dropped."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            ErrorCode.BAD_ENCODING, f"payload is not valid UTF-8 (byte {exc.start})"
        ) from exc
    return text.removeprefix("\ufeff")


def _json_depth(value: Any) -> int:
    """Deepest nesting of a parsed JSON value, walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would be read differently by different parsers: refuse to guess.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r} in JSON object")
        result[key] = value
    return result


def _request_from_fields(
    fields: dict[str, Any], max_question_chars: int, max_schema_bytes: int
) -> Request:
    raw_id = fields.get("id")
    if raw_id is None:
        request_id = new_request_id()
    elif isinstance(raw_id, str) and ID_PATTERN.fullmatch(raw_id):
        request_id = raw_id
    else:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"id: must be a string of {ID_RULE}")
    # Errors name the id only when the client chose it: a generated one is known to nobody.
    error_id = request_id if raw_id is not None else None

    def invalid(field_name: str, rule: str) -> RequestError:
        return RequestError(ErrorCode.INVALID_REQUEST, f"{field_name}: {rule}", error_id)

    if "question" not in fields:
        raise invalid("question", "is required")
    if not isinstance(fields["question"], str):
        raise invalid("question", "must be a string")
    question = _question(fields["question"], max_question_chars, error_id)

    max_tokens = fields.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise invalid("max_tokens", "must be a whole number >= 1")
    temperature = _optional_number(fields, "temperature", invalid)
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid("temperature", "must be a number from 0 to 2")
    deadline_s = _optional_number(fields, "deadline_s", invalid)
    if deadline_s is not None and deadline_s <= 0:
        raise invalid("deadline_s", "must be a number of seconds > 0")
    stream = fields.get("stream")
    if stream is None:
        stream = True  # null counts as absent, like every optional field
    if not isinstance(stream, bool):
        raise invalid("stream", "must be true or false")
    max_message_bytes = fields.get("max_message_bytes")
    if max_message_bytes is not None and (
        isinstance(max_message_bytes, bool)
        or not isinstance(max_message_bytes, int)
        or not MIN_MESSAGE_BYTES <= max_message_bytes <= MAX_MESSAGE_BYTES
    ):
        raise invalid(
            "max_message_bytes",
            f"must be a whole number of bytes from {MIN_MESSAGE_BYTES} to {MAX_MESSAGE_BYTES}",
        )
    stop = fields.get("stop")
    if stop is not None and (
        not isinstance(stop, list)
        or not 1 <= len(stop) <= MAX_STOPS
        or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise invalid(
            "stop", f"must be a list of 1-{MAX_STOPS} strings of 1-{MAX_STOP_CHARS} characters"
        )
    requested_format = None
    if fields.get("format") is not None:
        try:
            requested_format = answer_format(fields["format"], max_schema_bytes=max_schema_bytes)
        except FormatError as exc:
            raise invalid("format", str(exc)) from exc
    conversation_id = fields.get("conversation_id")
    if conversation_id is not None and not (
        isinstance(conversation_id, str) and ID_PATTERN.fullmatch(conversation_id)
    ):
        raise invalid("conversation_id", f"must be a string of {ID_RULE}")
    return Request(
        request_id,
        question,
        max_tokens,
        temperature,
        deadline_s,
        stream=stream,
        id_chosen=raw_id is not None,
        max_message_bytes=max_message_bytes,
        stop=tuple(stop or ()),
        answer_format=requested_format,
        conversation_id=conversation_id,
    )


def _optional_number(fields: dict[str, Any], name: str, invalid: Any) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, "must be a number")
    try:
        number = float(value)
    except OverflowError as exc:  # a huge JSON integer
        raise invalid(name, "is out of range") from exc
    if not math.isfinite(number):
        raise invalid(name, "must be a finite number")
    return number


def _question(text: str, max_chars: int, request_id: str | None) -> str:
    question = text.strip()
    if not question:
        raise RequestError(ErrorCode.INVALID_REQUEST, "question: must not be empty", request_id)
    if len(question) > max_chars:
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"question: {len(question)} characters; at most {max_chars} are accepted",
            request_id,
        )
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes like "\ud800"
        raise RequestError(
            ErrorCode.BAD_ENCODING, "question: contains an unpaired UTF-16 surrogate", request_id
        ) from exc
    control = _CONTROL.search(question)
    if control is not None:
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"question: contains the control character U+{ord(control.group()):04X}; only "
            "tab and line breaks are allowed",
            request_id,
        )
    return question


# {"conversation_id": "<64 characters>"} with generous room for white space.
_MAX_CANCEL_BYTES = 1024


def parse_cancel(payload: bytes) -> str | None:
    """The request id in a `P/cancel` payload (`{"id": ...}` or the bare id), or None."""
    return _id_payload(payload, "id")


def parse_forget(payload: bytes) -> str | None:
    """The conversation id in a `P/forget` payload (`{"conversation_id": ...}` or the bare id),
    or None."""
    return _id_payload(payload, "conversation_id")


def _id_payload(payload: bytes, key: str) -> str | None:
    if len(payload) > _MAX_CANCEL_BYTES:
        return None
    try:
        text = payload.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except (ValueError, RecursionError):
            return None
        found = fields.get(key) if isinstance(fields, dict) else None
    else:
        found = text
    return found if isinstance(found, str) and ID_PATTERN.fullmatch(found) else None
