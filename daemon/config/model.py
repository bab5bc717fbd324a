"""The model's keys: which GGUF answers, how it runs, and how the prompt is framed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config.keys import _at_least, _between, _key, _one_of

# Short, plain and about the shop floor: a base model copies the length and tone it is shown.
DEFAULT_EXAMPLES = [
    {
        "question": "What is a PLC?",
        "answer": "A programmable logic controller: a small industrial computer that runs a "
        "machine's control program.",
    },
    {
        "question": "What should I do if a machine jams?",
        "answer": "Press the stop button, lock out the machine, then clear the jam or call "
        "maintenance.",
    },
    {
        "question": "Why must I wear safety glasses?",
        "answer": "They protect your eyes from chips, dust and splashes.",
    },
]


def _examples(value: Any) -> str | None:
    rule = "must be a list of {question: ..., answer: ...} with non-empty strings"
    if not isinstance(value, list):
        return rule
    for example in value:
        if not isinstance(example, dict) or set(example) != {"question", "answer"}:
            return rule
        if not all(isinstance(text, str) and text.strip() for text in example.values()):
            return rule
    return None


def _stops(value: list[str]) -> str | None:
    if len(value) > 4 or not all(1 <= len(stop) <= 64 for stop in value):
        return "must be at most 4 strings of 1-64 characters"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """Which model answers, and how it is run."""

    path: str | None = _key(
        None, "GGUF file; null = the production model if fetched, else the embedded Gemma 3 270M"
    )
    dir: str | None = _key(
        None,
        "where fetch-model stores models; null = $STATE_DIRECTORY/models or "
        "~/.local/share/kioskd/models",
    )
    threads: int | None = _key(
        None, "decode threads; null = physical cores minus one, at least 1", _at_least(1)
    )
    threads_batch: int | None = _key(
        None, "prompt (prefill) threads; null = same as threads", _at_least(1)
    )
    ctx: int = _key(2048, "context window in tokens (prompt + answer)", _between(256, 131072))
    batch_tokens: int = _key(
        128,
        "prompt tokens computed per step; scratch memory grows with it, prefill speed barely does",
        _between(8, 4096),
    )
    mmap: bool = _key(
        False,
        "map the GGUF instead of reading it: repacked weights are then held twice (+13 MiB)",
    )
    gpu_layers: int = _key(
        0,
        "model layers offloaded to the GPU of a CUDA build (a Jetson); 0 = CPU only, 999 = all",
        _between(0, 999),
    )
    max_tokens: int = _key(
        256, "longest answer in tokens; requests may ask for fewer", _at_least(1)
    )
    temperature: float = _key(0.7, "default sampling temperature (0 = greedy)", _between(0, 2))
    system_prompt: str = _key(
        "You are a helpful assistant on a factory-floor kiosk. Answer briefly and plainly.",
        "system turn put before every question; clients cannot change it",
    )
    chat_format: str = _key(
        "auto",
        "chat format when the GGUF embeds no template: auto (from the model's "
        "architecture), chatml, gemma or llama-3",
        _one_of("auto", "chatml", "gemma", "llama-3"),
    )
    seed: int = _key(-1, "sampling seed; -1 = random", _at_least(-1))
    prompt_style: str = _key(
        "auto",
        "chat (the chat template) or completion (a Question:/Answer: frame with examples, for "
        "base models); auto = chat when the GGUF embeds a template, else completion",
        _one_of("auto", "chat", "completion"),
    )
    examples: list[dict[str, str]] = _key(
        DEFAULT_EXAMPLES,
        "completion style: question/answer pairs shown before every question",
        _examples,
    )
    stop: list[str] = _key([], "stop strings for every answer, besides the request's", _stops)
    repeat_penalty: float = _key(
        1.0, "penalty on tokens of the last 64 repeated (1.0 = off)", _between(1.0, 2.0)
    )
