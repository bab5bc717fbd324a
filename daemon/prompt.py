"""Chat prompts: the GGUF's own template when it has one, else a named format.

The question is tokenized on its own with special tokens off, so no text a client sends can
become a template control token; known turn markers are also removed from the text, so the
model does not read a forged turn either.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_chat_format

log = logging.getLogger(__name__)

_PLACEHOLDER = "KIOSKDQUESTIONSLOT7F3A"

# Turn and control markers of the common chat templates (ChatML/Qwen, Gemma, Llama 3, Phi, ...).
_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<start_of_turn>|<end_of_turn>|<bos>|<eos>"
    r"|<\|begin_of_text\|>|<\|start_header_id\|>|<\|end_header_id\|>|<\|eot_id\|>"
    r"|<\|system\|>|<\|user\|>|<\|assistant\|>|<\|end\|>|<s>|</s>|\[INST\]|\[/INST\]",
    re.IGNORECASE,
)

_FALLBACK_FORMATS: dict[str, Callable[..., Any]] = {
    "chatml": llama_chat_format.format_chatml,
    "gemma": llama_chat_format.format_gemma,
    "llama-3": llama_chat_format.format_llama3,
}

# GGUF general.architecture -> the chat format its instruct models were tuned on.
_FORMAT_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama-3",
    "qwen2": "chatml",
    "qwen3": "chatml",
}


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
    ) -> None:
        self._system_prompt = system_prompt
        self.source: str
        if embedded_template:
            formatter = llama_chat_format.Jinja2ChatFormatter(
                template=embedded_template, eos_token=eos_token, bos_token=bos_token
            )
            self._format: Callable[..., Any] = formatter
            self.source = "the GGUF's embedded chat template"
        else:
            self._format = _FALLBACK_FORMATS[fallback_format]
            self.source = f"the {fallback_format} chat format"

    def build(self, question: str) -> PromptParts:
        """Split the rendered prompt around a placeholder standing for the question."""
        rendered, add_bos = self._render(_PLACEHOLDER)
        before, found, after = rendered.partition(_PLACEHOLDER)
        if not found or _PLACEHOLDER in after:
            raise RuntimeError("the chat template does not place the user's text exactly once")
        return PromptParts(before, strip_markers(question), after, add_bos)

    def _render(self, user_text: str) -> tuple[str, bool]:
        messages = [
            {"role": "system", "content": self._system_prompt},
            {"role": "user", "content": user_text},
        ]
        try:
            response = self._format(messages=messages)
            dropped_system = self._system_prompt.strip() not in response.prompt
        except Exception:  # noqa: BLE001 - templates raise anything, e.g. "System role not supported"
            dropped_system = True
        if dropped_system:
            # Formats without a system turn (Gemma's) get the instructions ahead of the question.
            merged = [{"role": "user", "content": f"{self._system_prompt}\n\n{user_text}"}]
            response = self._format(messages=merged)
        return response.prompt, not getattr(response, "added_special", False)
