"""The MQTT payloads of docs/protocol.md: one small type per message.

Incoming payloads are validated once, at the edge, by daemon/validation.py into these types.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from daemon.grammar import AnswerFormat, JsonValue

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
ID_RULE = "1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"

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
