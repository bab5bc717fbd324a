"""What the scheduler asks of a model, and what it gets back: the seam between the two.

The engine implements Generator (turns.Turns wraps it for conversations); the scheduler only
knows this protocol, so neither imports the other, and tests can drive the scheduler with a
fake generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon.grammar import AnswerFormat, JsonValue
from daemon.messages import ConversationInfo


@dataclass(frozen=True)
class Generation:
    """What the engine reports back about one answer."""

    text: str
    stopped: bool  # True when should_stop ended it early
    hit_length: bool
    prompt_tokens: int
    completion_tokens: int
    first_token_monotonic: float | None
    end_monotonic: float
    # With a format: the parsed answer, or why a complete answer does not meet it.
    json: JsonValue | None = None
    json_error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose model state was reused
    conversation: ConversationInfo | None = None  # for a turn of a conversation


class Generator(Protocol):
    """The part of the engine the scheduler drives."""

    def generate(
        self,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
        stop: Sequence[str] = (),
        answer_format: AnswerFormat | None = None,
        conversation_id: str | None = None,
    ) -> Generation: ...
