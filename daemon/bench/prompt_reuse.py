"""`kioskd bench prompt-reuse`: time to first token with the system prompt's KV cache kept, and
with it thrown away, on one in-process engine (no daemon, no broker)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.bench.harness import bench_engine, generate_silently, interleave
from daemon.engine import Engine

# About 150 tokens of realistic kiosk instructions (the exact count is measured and reported).
LONG_SYSTEM_PROMPT = (
    "You are the help desk of assembly line 3 at a factory. Answer operators' questions about "
    "machines, safety and procedures. Rules: answer in at most three short sentences; use plain "
    "words, no jargon; if a question is about an emergency, tell the operator to press the red "
    "stop button and call the shift lead on extension 4410 before anything else; never guess "
    "torque values, temperatures or chemical mixtures, say that the operator must check the "
    "binder at the station; lockout-tagout is required before opening any guard; forklifts have "
    "right of way in aisles B and C; the canteen closes at 14:30; report scrap counts at the "
    "end of each shift on the terminal by the exit. If you do not know, say so and suggest "
    "asking the maintenance team on channel 2 of the radio."
)
QUESTIONS = (
    "How do I restart the label printer?",
    "Where do I report scrap?",
    "What do I do before opening a guard?",
    "Who has right of way in aisle B?",
)


@dataclass(frozen=True)
class PromptReuseResult:
    system_prompt_tokens: int
    prompt_tokens: int
    first_token_ms_with_reuse_median: float
    first_token_ms_without_reuse_median: float
    reduction_percent: float
    samples: dict[str, list[float]]  # "reuse" and "cold", ms


def _first_token_ms(engine: Engine, question: str) -> float:
    started = time.monotonic()
    result = generate_silently(engine.generate, question, max_tokens=1)
    if result.first_token_monotonic is None:
        raise RuntimeError("no token")
    return (result.first_token_monotonic - started) * 1000


def run_prompt_reuse(*, reps: int, threads: int, model: Path) -> PromptReuseResult:
    """Both ways in turn, a different question each repetition."""
    engine = bench_engine(model, threads, max_tokens=8, system_prompt=LONG_SYSTEM_PROMPT)
    system_tokens = engine.count_tokens(LONG_SYSTEM_PROMPT)
    prompt_tokens = len(engine.prompt_tokens(QUESTIONS[0]))
    _first_token_ms(engine, "warm-up")

    def measure(mode: str, rep: int) -> float:
        question = QUESTIONS[rep % len(QUESTIONS)]
        if mode == "cold":
            engine.forget_prompt_cache()  # the whole prompt is evaluated again
        else:
            _first_token_ms(engine, QUESTIONS[(rep + 1) % len(QUESTIONS)])  # cache: the prefix
        return _first_token_ms(engine, question)

    measured = interleave(("reuse", "cold"), reps, measure, lambda mode, ms: f"{mode} {ms:.1f} ms")
    engine.close()
    samples = {mode: [ms for cell, ms in measured if cell == mode] for mode in ("reuse", "cold")}
    reuse_ms, cold_ms = statistics.median(samples["reuse"]), statistics.median(samples["cold"])
    return PromptReuseResult(
        system_prompt_tokens=system_tokens,
        prompt_tokens=prompt_tokens,
        first_token_ms_with_reuse_median=round(reuse_ms, 1),
        first_token_ms_without_reuse_median=round(cold_ms, 1),
        reduction_percent=round(100 * (1 - reuse_ms / cold_ms), 1),
        samples=samples,
    )
