"""Chat prompts: the GGUF's own template when it has one, else a named format.

llama.cpp renders the templates it knows (ChatML/Qwen, Gemma, Llama 3 and some forty more, told
apart by their text); only a template it does not know is run as Jinja, and only then is jinja2
imported.

The question is tokenized on its own with special tokens off, so no text a client sends can
become a template control token; known turn markers are also removed from the text, so the
model does not read a forged turn either.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.llamacpp import lib

log = logging.getLogger(__name__)

_PLACEHOLDER = "KIOSKDQUESTIONSLOT7F3A"
# One slot per message of a conversation, numbered in order: KIOSKDSLOT0X, KIOSKDSLOT1X, ...
_SLOT = re.compile(r"KIOSKDSLOT(\d+)X")

# Turn and control markers of the common chat templates (ChatML/Qwen, Gemma, Llama 3, Phi, ...).
_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<start_of_turn>|<end_of_turn>|<bos>|<eos>"
    r"|<\|begin_of_text\|>|<\|start_header_id\|>|<\|end_header_id\|>|<\|eot_id\|>"
    r"|<\|system\|>|<\|user\|>|<\|assistant\|>|<\|end\|>|<s>|</s>|\[INST\]|\[/INST\]",
    re.IGNORECASE,
)

# config model.chat_format -> llama.cpp's name for the same built-in template.
_NAMED_FORMATS = {"chatml": "chatml", "gemma": "gemma", "llama-3": "llama3"}

# GGUF general.architecture -> the chat format its instruct models were tuned on.
_FORMAT_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama-3",
    "qwen2": "chatml",
    "qwen3": "chatml",
}

Messages = list[dict[str, str]]


def fallback_format(configured: str, architecture: str | None) -> str:
    """The named chat format to use when the GGUF embeds no template."""
    if configured != "auto":
        return configured
    return _FORMAT_BY_ARCHITECTURE.get(architecture or "", "chatml")


def strip_markers(text: str) -> str:
    """Remove chat-template turn markers from client text, also ones assembled by removal."""
    while True:
        stripped = _MARKERS.sub("", text)
        if stripped == text:
            return text
        text = stripped


def render_builtin(template: str, messages: Messages) -> str | None:
    """The prompt from llama.cpp's own renderer, or None if it does not know the template."""
    chat = (lib.llama_chat_message * len(messages))(
        *(lib.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages)
    )
    size = 1024 + 2 * sum(len(m["content"].encode()) for m in messages)
    for _attempt in range(2):
        buffer = ctypes.create_string_buffer(size)
        length = lib.llama_chat_apply_template(
            template.encode(), chat, len(messages), True, buffer, size
        )
        if length < 0:
            return None
        if length <= size:
            return buffer.raw[:length].decode("utf-8", "replace")
        size = length  # the return value is the length it needed
    return None


def jinja_renderer(template: str, bos_token: str, eos_token: str) -> Callable[[Messages], str]:
    """Render `template` as Jinja, sandboxed, with the variables chat templates expect."""
    from jinja2.exceptions import TemplateError  # noqa: PLC0415 - 6.5 MiB, only for odd templates
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(date_format: str) -> str:
        return datetime.datetime.now(tz=datetime.UTC).strftime(date_format)

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        template
    )

    def render(messages: Messages) -> str:
        return compiled.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=True,
            raise_exception=raise_exception,
            strftime_now=strftime_now,
        )

    return render


@dataclass(frozen=True)
class PromptParts:
    """A rendered prompt split around the question, for separate tokenization."""

    before: str
    question: str
    after: str
    add_bos: bool


@dataclass(frozen=True)
class PromptSegments:
    """A rendered prompt as (text, is_template) pieces: template text is tokenized with its
    control tokens, client text (questions, earlier answers) without."""

    segments: tuple[tuple[str, bool], ...]
    add_bos: bool


class PromptBuilder:
    """Renders system prompt + question with the model's chat template."""

    def __init__(
        self,
        *,
        system_prompt: str,
        embedded_template: str | None,
        fallback_format: str,
        bos_token: str,
        eos_token: str,
        add_bos: bool = True,
    ) -> None:
        self._system_prompt = system_prompt
        # What decides the rendering, for telling whether a saved model state still fits.
        self.template_text = embedded_template or f"builtin:{fallback_format}"
        self._bos_token = bos_token
        self._add_bos = add_bos
        self.source: str
        self._render: Callable[[Messages], str]
        if embedded_template:
            self.source = "the GGUF's embedded chat template"
            if render_builtin(embedded_template, _PROBE) is not None:
                self._render = lambda messages: _builtin_or_fail(embedded_template, messages)
            else:
                self._render = jinja_renderer(embedded_template, bos_token, eos_token)
                self.source += " (as Jinja)"
        else:
            name = _NAMED_FORMATS[fallback_format]
            self._render = lambda messages: _builtin_or_fail(name, messages)
            self.source = f"the {fallback_format} chat format"

    def build(self, question: str) -> PromptParts:
        """Split the rendered prompt around a placeholder standing for the question."""
        rendered = self._with_system_prompt(_PLACEHOLDER)
        before, found, after = rendered.partition(_PLACEHOLDER)
        if not found or _PLACEHOLDER in after:
            raise RuntimeError("the chat template does not place the user's text exactly once")
        # A Jinja template may write the BOS token itself; the tokenizer must not add another.
        add_bos = self._add_bos and not (self._bos_token and before.startswith(self._bos_token))
        return PromptParts(before, strip_markers(question), after, add_bos)

    def build_turns(self, question: str, history: Sequence[tuple[str, str]]) -> PromptSegments:
        """The prompt of a conversation's next turn: the earlier (question, answer) turns in
        order, then `question`, as template text and client text taking turns.

        Each turn is rendered as the template renders it in any later turn, so that the
        prompt of one turn is the start of the next one's and its model state can be reused.
        """
        count = 2 * len(history) + 1
        slots = [f"KIOSKDSLOT{index}X" for index in range(count)]
        turns = [
            {"role": "user" if index % 2 == 0 else "assistant", "content": slot}
            for index, slot in enumerate(slots)
        ]
        pieces = _SLOT.split(self._with_system_prompt(turns))
        # split() with a group gives text, slot number, text, ..., text.
        if [int(number) for number in pieces[1::2]] != list(range(count)):
            raise RuntimeError("the chat template does not place each turn's text exactly once")
        texts = [text for exchange in history for text in exchange] + [question]
        segments: list[tuple[str, bool]] = []
        for index, template_text in enumerate(pieces[0::2]):
            segments.append((template_text, True))
            if index < count:
                segments.append((strip_markers(texts[index]), False))
        before = pieces[0]
        add_bos = self._add_bos and not (self._bos_token and before.startswith(self._bos_token))
        return PromptSegments(tuple(segments), add_bos)

    def _with_system_prompt(self, turns: str | Messages) -> str:
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
        messages = [{"role": "system", "content": self._system_prompt}, *turns]
        try:
            rendered = self._render(messages)
            dropped_system = self._system_prompt.strip() not in rendered
        except Exception:  # noqa: BLE001 - templates raise anything, e.g. "System role not supported"
            dropped_system = True
        if dropped_system:
            # Formats without a system turn get the instructions ahead of the first question.
            first = turns[0]
            merged = [
                {"role": "user", "content": f"{self._system_prompt}\n\n{first['content']}"},
                *turns[1:],
            ]
            rendered = self._render(merged)
        return rendered


_PROBE: Messages = [{"role": "user", "content": "x"}]


def _builtin_or_fail(template: str, messages: Messages) -> str:
    rendered = render_builtin(template, messages)
    if rendered is None:
        raise RuntimeError(f"llama.cpp cannot render the chat template {template[:40]!r}")
    return rendered
