"""The MQTT payloads of docs/protocol.md: one small type per message, validated once at the edge."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from daemon.grammar import AnswerFormat, FormatError, JsonValue, answer_format

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# C0 controls (but tab, newline, carriage return), DEL and C1 controls: never part of a question.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
ID_RULE = "1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
MAX_JSON_DEPTH = 32
# docs/protocol.md "Tiny devices": a request's max_message_bytes; 192 leaves a done room for its id.
MIN_MESSAGE_BYTES = 192
MAX_MESSAGE_BYTES = 65536
# docs/protocol.md "Stop strings and JSON answers": 1-4 stop strings of 1-64 characters.
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_SCHEMA_BYTES = 8192

FinishReason = Literal["stop", "length", "cancelled", "deadline"]


class ErrorCode(StrEnum):
    """Machine-readable error codes (docs/protocol.md, "Errors")."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    BAD_ENCODING = "bad_encoding"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    OVERHEATED = "overheated"
    FORBIDDEN_REPLY_TOPIC = "forbidden_reply_topic"
    MODEL_ERROR = "model_error"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    DUPLICATE_ID = "duplicate_id"


@dataclass(frozen=True)
class Request:
    """A validated question from `P/ask`."""

    id: str
    question: str
    max_tokens: int | None = None
    temperature: float | None = None
    deadline_s: float | None = None
    # False: no chunk messages, only queued and the terminal message (docs/protocol.md, v2).
    stream: bool = True
    # Whether the client chose the id; errors name only such ids (a generated one is unknown).
    id_chosen: bool = True
    # The largest PUBLISH packet the client can take (docs/protocol.md, "Tiny devices").
    max_message_bytes: int | None = None
    # The answer ends before the first of these (docs/protocol.md, "Stop strings and JSON answers").
    stop: tuple[str, ...] = ()
    # The request's `format`: the answer is JSON under this grammar and schema.
    answer_format: AnswerFormat | None = None
    # The conversation this question continues or starts (docs/protocol.md, "Conversations").
    conversation_id: str | None = None


class RequestError(Exception):
    """A request that cannot be accepted; `request_id` is set when it can be attributed."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def new_request_id() -> str:
    """A fresh id for requests that bring none: 12 hex characters."""
    return secrets.token_hex(6)


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


# --- outgoing stream messages -----------------------------------------------------------


class StreamMessage:
    """A message of a request's stream; `fields()` is what follows id, seq and type."""

    type: ClassVar[str]
    terminal: ClassVar[bool] = False

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_payload(
        self, request_id: str | None, seq: int, *, restart: bool = False, device: str | None = None
    ) -> bytes:
        body: dict[str, Any] = {"id": request_id, "seq": seq, "type": self.type}
        if restart:
            # docs/protocol.md, "Crash safety": this id's stream starts again from seq 0.
            body["restart"] = True
        body.update(self.fields())
        if self.terminal and device is not None:
            body["device"] = device  # docs/protocol.md, "Fleet": who answered
        return _dumps(body)


@dataclass(frozen=True)
class Queued(StreamMessage):
    type: ClassVar[str] = "queued"
    position: int

    def fields(self) -> dict[str, Any]:
        return {"position": self.position}


@dataclass(frozen=True)
class Chunk(StreamMessage):
    type: ClassVar[str] = "chunk"
    text: str

    def fields(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose model state was reused, not computed (docs/protocol.md, "Prompt reuse").
    cached_tokens: int = 0


@dataclass(frozen=True)
class ConversationInfo:
    """`done.conversation`: where a turn stands in its conversation (docs/protocol.md)."""

    id: str
    turn: int  # 1 = first; a turn that is not remembered leaves the number to the next one
    context_tokens: int  # tokens of the earlier turns the model saw, after dropping
    dropped_turns: int  # turns cut so far for the token budget
    new: bool  # this turn started the conversation

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "turn": self.turn,
            "context_tokens": self.context_tokens,
            "dropped_turns": self.dropped_turns,
            "new": self.new,
        }


@dataclass(frozen=True)
class Timing:
    queued_ms: float
    first_token_ms: float | None
    total_ms: float
    tokens_per_s: float | None


@dataclass(frozen=True)
class Done(StreamMessage):
    type: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True
    text: str
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    # Parts left out to fit a small packet, in this order (docs/protocol.md, "Tiny devices").
    omitted: tuple[str, ...] = ()
    # With `format`: the parsed answer, or why a complete answer is not what was asked for.
    json: JsonValue | None = None
    json_error: str | None = None
    conversation: ConversationInfo | None = None

    def fields(self) -> dict[str, Any]:
        timing = self.timing
        body: dict[str, Any] = {}
        if "text" in self.omitted:
            body["text_omitted"] = True  # the client has the text from the chunks
        else:
            body["text"] = self.text
        body["finish_reason"] = self.finish_reason
        if self.json is not None:
            if "json" in self.omitted:
                body["json_omitted"] = True  # the text (from the chunks) holds the same JSON
            else:
                body["json"] = self.json.value
        if self.json_error is not None:
            body["json_error"] = self.json_error
        if "usage" not in self.omitted:
            body["usage"] = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "cached_tokens": self.usage.cached_tokens,
            }
        if "timing" not in self.omitted:
            body["timing"] = {
                "queued_ms": round(timing.queued_ms, 1),
                "first_token_ms": _round(timing.first_token_ms),
                "total_ms": round(timing.total_ms, 1),
                "tokens_per_s": _round(timing.tokens_per_s),
            }
        if self.conversation is not None:
            # Never left out: a tiny device needs it to know whether its turn was remembered.
            body["conversation"] = self.conversation.to_dict()
        return body

    def smaller(self) -> list[Done]:
        """Ever smaller copies: without text, json, timing, then usage."""
        # Only parts the message has: a done without json has no json to leave out.
        parts = tuple(part for part in _DONE_OMISSIONS if part != "json" or self.json is not None)
        return [
            dataclasses.replace(self, omitted=parts[: count + 1])
            for count in range(len(self.omitted), len(parts))
        ]


_DONE_OMISSIONS = ("text", "json", "timing", "usage")


@dataclass(frozen=True)
class Error(StreamMessage):
    type: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True
    code: ErrorCode
    message: str
    retry_after_s: float | None = None

    def fields(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body

    def shortened(self, cut_bytes: int) -> Error:
        """This error with its message `cut_bytes` shorter in UTF-8 (never mid-character)."""
        encoded = self.message.encode("utf-8")
        kept = encoded[: max(0, len(encoded) - cut_bytes - 3)].decode("utf-8", "ignore")
        return dataclasses.replace(self, message=kept + "...")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def duplicate_id_payload(request_id: str, device: str) -> bytes:
    """The refusal of a request whose id is running or queued: no seq, so that it can never be
    read as a message of the running request's stream (docs/protocol.md, "Duplicate ids")."""
    return _dumps(
        {
            "id": request_id,
            "type": "error",
            "code": str(ErrorCode.DUPLICATE_ID),
            "message": f"a request with id {request_id!r} is already running or queued on this "
            "kiosk; its answer goes on; use a new id for a new question",
            "device": device,
        }
    )


# --- health ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """The retained `P/health` telemetry message (docs/protocol.md, "Health")."""

    ts: float
    device: str
    state: str
    uptime_s: int
    cpu: Mapping[str, Any]
    memory: Mapping[str, Any]
    thermal: Mapping[str, Any]
    model: Mapping[str, Any]
    queue: Mapping[str, Any]
    counters: Mapping[str, Any]
    last: Mapping[str, Any]
    conversations: Mapping[str, Any]
    fleet: Mapping[str, Any] | None = None

    def to_payload(self) -> bytes:
        body = {
            "ts": round(self.ts, 3),
            "device": self.device,
            "state": self.state,
            "uptime_s": self.uptime_s,
            "cpu": dict(self.cpu),
            "memory": dict(self.memory),
            "thermal": dict(self.thermal),
            "model": dict(self.model),
            "queue": dict(self.queue),
            "counters": dict(self.counters),
            "last": dict(self.last),
            "conversations": dict(self.conversations),
            "fleet": None if self.fleet is None else dict(self.fleet),
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
