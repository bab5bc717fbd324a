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
from collections.abc import Callable
from dataclasses import dataclass

from daemon.llamacpp import lib

log = logging.getLogger(__name__)

_PLACEHOLDER = "KIOSKDQUESTIONSLOT7F3A"

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

    def _with_system_prompt(self, user_text: str) -> str:
        messages = [
            {"role": "system", "content": self._system_prompt},
            {"role": "user", "content": user_text},
        ]
        try:
            rendered = self._render(messages)
            dropped_system = self._system_prompt.strip() not in rendered
        except Exception:  # noqa: BLE001 - templates raise anything, e.g. "System role not supported"
            dropped_system = True
        if dropped_system:
            # Formats without a system turn get the instructions ahead of the question.
            merged = [{"role": "user", "content": f"{self._system_prompt}\n\n{user_text}"}]
            rendered = self._render(merged)
        return rendered


_PROBE: Messages = [{"role": "user", "content": "x"}]


def _builtin_or_fail(template: str, messages: Messages) -> str:
    rendered = render_builtin(template, messages)
    if rendered is None:
        raise RuntimeError(f"llama.cpp cannot render the chat template {template[:40]!r}")
    return rendered
