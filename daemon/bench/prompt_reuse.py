"""Model-only measurements for `kioskd bench`: system prompt reuse and a thread sweep."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import psutil

from daemon.bench.compare import raw_llama, rotated
from daemon.engine import Engine, EngineSettings
from daemon.testhooks import TestHooks

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


def _engine(model: Path, threads: int, system_prompt: str) -> Engine:
    settings = EngineSettings(
        path=model,
        threads=threads,
        threads_batch=threads,
        ctx=2048,
        max_tokens=8,
        temperature=0.0,
        system_prompt=system_prompt,
        chat_format="auto",
    )
    return Engine(settings, TestHooks(ignore_eos=True))


def _first_token_ms(engine: Engine, question: str) -> float:
    started = time.monotonic()
    result = engine.generate(
        question,
        max_tokens=1,
        temperature=0.0,
        on_text=lambda _text: None,
        should_stop=lambda: False,
    )
    if result.first_token_monotonic is None:
        raise RuntimeError("no token")
    return (result.first_token_monotonic - started) * 1000


def run_prompt_reuse(*, reps: int, threads: int, model: Path) -> dict[str, Any]:
    """Time to first token with the system prompt's KV cache kept, and with it thrown away."""
    engine = _engine(model, threads, LONG_SYSTEM_PROMPT)
    system_tokens = engine.count_tokens(LONG_SYSTEM_PROMPT)
    prompt_tokens = len(engine.prompt_tokens(QUESTIONS[0]))
    reused: list[float] = []
    cold: list[float] = []
    _first_token_ms(engine, "warm-up")
    for rep in range(reps):
        question = QUESTIONS[rep % len(QUESTIONS)]
        for mode in rotated(("reuse", "cold"), rep):
            if mode == "cold":
                engine.forget_prompt_cache()  # the whole prompt is evaluated again
                cold.append(_first_token_ms(engine, question))
            else:
                _first_token_ms(engine, QUESTIONS[(rep + 1) % len(QUESTIONS)])  # cache: prefix
                reused.append(_first_token_ms(engine, question))
        print(
            f"rep {rep + 1}/{reps}: reuse {reused[-1]:.1f} ms, cold {cold[-1]:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
    engine.close()
    reuse_ms, cold_ms = statistics.median(reused), statistics.median(cold)
    return {
        "system_prompt_tokens": system_tokens,
        "prompt_tokens": prompt_tokens,
        "first_token_ms_with_reuse_median": round(reuse_ms, 1),
        "first_token_ms_without_reuse_median": round(cold_ms, 1),
        "reduction_percent": round(100 * (1 - reuse_ms / cold_ms), 1),
        "samples": {"reuse": reused, "cold": cold},
    }


def run_threads_sweep(*, reps: int, model: Path, max_threads: int | None) -> dict[str, Any]:
    """Decode and prefill speed at 1..N threads, and the thread counts to configure."""
    top = max_threads or os.cpu_count() or 1
    engine = _engine(model, top, LONG_SYSTEM_PROMPT)
    prompt = engine.prompt_tokens(QUESTIONS[0])
    llama = raw_llama(engine.settings)  # llama.cpp's own speed, without kioskd around it
    engine.close()
    rows = []
    for threads in range(1, top + 1):
        llama_cpp.llama_set_n_threads(llama.ctx, threads, threads)
        prefill: list[float] = []
        decode: list[float] = []
        for _ in range(reps):
            llama.reset()  # type: ignore[no-untyped-call]
            started = time.monotonic()
            llama.eval(prompt)
            prefill.append(len(prompt) / (time.monotonic() - started))
            count, first = 0, 0.0
            for _token in llama.generate(prompt, temp=0.0, reset=True):
                count += 1
                if count == 1:
                    first = time.monotonic()
                if count >= 64:
                    break
            decode.append((count - 1) / (time.monotonic() - first))
        row = {
            "threads": threads,
            "prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "decode_tokens_per_s": round(statistics.median(decode), 1),
        }
        rows.append(row)
        print(
            f"{threads} threads: prefill {row['prefill_tokens_per_s']} tok/s, decode "
            f"{row['decode_tokens_per_s']} tok/s",
            file=sys.stderr,
            flush=True,
        )
    llama.close()
    best_decode = max(r["decode_tokens_per_s"] for r in rows)
    best_prefill = max(r["prefill_tokens_per_s"] for r in rows)
    # The fewest threads within 5 % of the best: more threads only add heat and contention.
    decode_pick = min(r["threads"] for r in rows if r["decode_tokens_per_s"] >= 0.95 * best_decode)
    prefill_pick = min(
        r["threads"] for r in rows if r["prefill_tokens_per_s"] >= 0.95 * best_prefill
    )
    return {
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "prompt_tokens": len(prompt),
        "rows": rows,
        "recommended": {"model.threads": decode_pick, "model.threads_batch": prefill_pick},
    }
