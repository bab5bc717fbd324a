"""A question's way through kioskd: the queue, client limits, conversations, chunks, shutdown."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config.keys import _at_least, _between, _key, _positive


@dataclass(frozen=True)
class QueueConfig:
    """The bounded queue in front of the single generation worker."""

    capacity: int = _key(8, "requests that may wait behind the running one", _between(0, 1000))


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a client may send."""

    max_question_chars: int = _key(2000, "longest accepted question", _at_least(1))
    max_payload_bytes: int = _key(65536, "largest accepted request payload", _at_least(64))
    max_schema_bytes: int = _key(
        8192, "largest JSON schema a request's format may bring, as compact JSON", _at_least(64)
    )
    max_requests_per_s: float | None = _key(
        None,
        "questions per second accepted from one sender (see docs/security.md); null = no limit",
        _positive,
    )
    dedup_s: float = _key(
        60.0,
        "a retry with the same id and question this soon after its answer gets that answer again",
        _positive,
    )
    dedup_max_ids: int = _key(
        1024, "ended request ids remembered for dedup_s (bounds the memory)", _between(1, 100000)
    )


@dataclass(frozen=True)
class ConversationsConfig:
    """Follow-up questions: what is kept of a conversation, for how long, and where."""

    max_context_tokens: int | None = _key(
        None,
        "budget of a turn's whole prompt in model tokens; older turns are dropped to fit; "
        "null = model.ctx - model.max_tokens",
        _at_least(16),
    )
    ttl_s: float = _key(
        300.0, "a conversation is forgotten this long after its last answer", _positive
    )
    max_active: int = _key(
        32, "conversations kept; beyond this the least recently used is dropped", _between(1, 10000)
    )
    max_state_mb: float = _key(
        64.0,
        "memory (and disk) for saved model state of conversations; least recently used first "
        "out (their text stays); 0 = keep none",
        _at_least(0),
    )
    persist: bool = _key(True, "keep conversations across a restart of kioskd (saved to disk)")
    dir: str | None = _key(
        None,
        "where conversations are saved; null = $STATE_DIRECTORY/conversations or "
        "~/.local/share/kioskd/conversations",
    )


@dataclass(frozen=True)
class ShutdownConfig:
    """What happens on SIGTERM."""

    grace_s: float = _key(
        5.0, "time the running answer may take to finish on shutdown", _at_least(0)
    )


@dataclass(frozen=True)
class StreamConfig:
    """How answer text is cut into chunk messages."""

    flush_ms: float = _key(
        0.0,
        "after the first chunk, gather text for this long per chunk (0 = every token at once)",
        _between(0, 5000),
    )
    max_chunk_chars: int | None = _key(
        None, "longest chunk text in characters; null = no limit", _at_least(1)
    )
