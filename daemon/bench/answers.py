"""`kioskd bench answers`: how long the embedded model's answers are, and whether they end by
themselves, per prompt style and repeat penalty, on tests/data/factory-questions.txt."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from daemon.bench.harness import engine_settings, generate_silently, progress
from daemon.bench.results import command_line
from daemon.config import Config
from daemon.engine import Engine

QUESTIONS_FILE = Path("tests/data/factory-questions.txt")
# (prompt style, repeat penalty): chat is how the embedded model was asked before the completion
# frame (its architecture's chat format, no stop strings).
ANSWER_VARIANTS = (("chat", 1.0), ("completion", 1.0), ("completion", 1.1), ("completion", 1.3))


@dataclass(frozen=True)
class Quantiles:
    min: float
    p25: float
    median: float
    p75: float
    p90: float
    max: float


@dataclass(frozen=True)
class AnswerRow:
    answers: int
    stop_within_120_share: float
    length_cut: int  # answers that reached max_tokens
    completion_tokens: Quantiles


@dataclass(frozen=True)
class AnswersResult:
    command: str
    model: str
    questions: int
    reps: int
    max_tokens: int
    temperature: float
    summary: dict[str, AnswerRow]  # by "STYLE, repeat_penalty P"


def _quantiles(values: list[int]) -> Quantiles:
    quartiles = statistics.quantiles(values, n=4)
    return Quantiles(
        min=min(values),
        p25=quartiles[0],
        median=statistics.median(values),
        p75=quartiles[2],
        p90=statistics.quantiles(values, n=10)[8],
        max=max(values),
    )


def _lengths(engine: Engine, asked: list[str], reps: int) -> tuple[list[int], int]:
    """Every question `reps` times: the answers' lengths, and how many ended within 120."""
    lengths, ended = [], 0
    for _rep in range(reps):
        for question in asked:
            # None: the default model settings' max_tokens and temperature.
            answer = generate_silently(engine.generate, question, max_tokens=None, temperature=None)
            lengths.append(answer.completion_tokens)
            ended += not answer.hit_length and answer.completion_tokens <= 120
    return lengths, ended


def run_answers(
    *, reps: int, threads: int, model: Path, questions: Path = QUESTIONS_FILE
) -> AnswersResult:
    """Every question `reps` times with the default model settings, per prompt style and
    repeat penalty."""
    lines = questions.read_text(encoding="utf-8").splitlines()
    asked = [line for line in lines if line.strip() and not line.startswith("#")]
    defaults = Config().model
    summary: dict[str, AnswerRow] = {}
    for style, penalty in ANSWER_VARIANTS:
        base = engine_settings(
            model, threads, max_tokens=defaults.max_tokens, system_prompt=defaults.system_prompt
        )
        engine = Engine(  # no test hooks: answers end where the model ends them
            replace(
                base,
                ctx=defaults.ctx,
                temperature=defaults.temperature,
                chat_format=defaults.chat_format,
                prompt_style=style,
                repeat_penalty=penalty,
            )
        )
        try:
            lengths, ended = _lengths(engine, asked, reps)
        finally:
            engine.close()
        name = f"{style}, repeat_penalty {penalty}"
        summary[name] = AnswerRow(
            answers=len(lengths),
            stop_within_120_share=round(ended / len(lengths), 3),
            length_cut=sum(n >= defaults.max_tokens for n in lengths),
            completion_tokens=_quantiles(lengths),
        )
        progress(f"{name:32} {summary[name]}")
    return AnswersResult(
        command=command_line(),
        model=str(model),
        questions=len(asked),
        reps=reps,
        max_tokens=defaults.max_tokens,
        temperature=defaults.temperature,
        summary=summary,
    )
