"""The completion frame: how a base model (one without a chat template) is asked a question.

A base model continues text; it has no turn to end. Framed as a short document of questions
and answers, it writes one answer and then starts the next "Question:", or leaves a blank line
first, and those are its stop strings. Measured on the embedded Gemma 3 270M (docs/
benchmarks.md): asked bare, it ran to max_tokens on every question; framed, it ends by itself.

The instructions and the examples come first and never change, so the engine keeps their KV
cache from one question to the next, as it does for a chat model's system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.prompt import PromptParts, PromptSegments, strip_markers

QUESTION = "Question:"
ANSWER = "Answer:"
# Where a framed answer ends: a blank line, or the model going on to ask the next question.
STOPS = ("\n\n", f"\n{QUESTION}")


@dataclass(frozen=True)
class Example:
    """One question and answer shown to the model before the real question."""

    question: str
    answer: str


class CompletionFrame:
    """Renders system prompt + examples + question as a question/answer document."""

    source = "the completion frame (the model has no chat template)"
    stops = STOPS

    def __init__(
        self, *, system_prompt: str, examples: Sequence[Example], add_bos: bool = True
    ) -> None:
        shown = "".join(
            f"{QUESTION} {_one_line(e.question)}\n{ANSWER} {_one_line(e.answer)}\n\n"
            for e in examples
        )
        instructions = system_prompt.strip()
        self._before = (f"{instructions}\n\n" if instructions else "") + shown + QUESTION
        self._add_bos = add_bos

    def build(self, question: str, history: Sequence[tuple[str, str]] = ()) -> PromptParts:
        """The prompt around `question`; `history` holds a conversation's earlier turns
        (question, answer), which follow the examples in the same frame."""
        before = self._before
        if history:
            turns = "".join(
                f" {_one_line(strip_markers(q))}\n{ANSWER} {_no_blank_line(a)}\n\n{QUESTION}"
                for q, a in history
            )
            before += turns
        # The space goes with the question: the tokenizers split "Question: What" as
        # "Question", ":", " What", so the frame's tokens stay the same for every question.
        return PromptParts(
            before, " " + _one_line(strip_markers(question)), f"\n{ANSWER}", self._add_bos
        )

    @property
    def template_text(self) -> str:
        """What a saved conversation state depends on besides the model: the whole frame."""
        return f"completion frame:{self._before}"

    def build_turns(self, question: str, history: Sequence[tuple[str, str]]) -> PromptSegments:
        """`build` as frame text and client text taking turns (PromptBuilder.build_turns),
        so that one turn's prompt is the start of the next one's and its state is reused."""
        segments: list[tuple[str, bool]] = [(self._before, True)]
        for asked, answered in history:
            segments += [
                (" " + _one_line(strip_markers(asked)), False),
                (f"\n{ANSWER}", True),
                (" " + _no_blank_line(answered), False),
                (f"\n\n{QUESTION}", True),
            ]
        segments += [(" " + _one_line(strip_markers(question)), False), (f"\n{ANSWER}", True)]
        return PromptSegments(tuple(segments), self._add_bos)


def _one_line(text: str) -> str:
    """A question on one line: a line break in it could start a forged "Answer:" line."""
    return " ".join(text.split())


def _no_blank_line(text: str) -> str:
    """A blank line inside the frame would read as the end of an answer: fold it."""
    return _BLANK_LINES.sub("\n", text.strip())


_BLANK_LINES = re.compile(r"\n\s*\n")
