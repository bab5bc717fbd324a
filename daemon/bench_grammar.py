"""`kioskd bench grammar`: decode speed of JSON answers under a grammar against free decoding.

Three ways to pick each token, interleaved on every model in one run so that machine noise hits
all alike: free (no grammar), checked (sample freely, check that one token against the grammar,
mask the whole vocabulary only when it is rejected; what kioskd does) and masked (the whole
vocabulary checked at every token). The grammar comes from a 5-field schema. Models: the
embedded Gemma 3 270M (262,144 tokens) and, with --qwen, the Qwen2.5-0.5B-shaped model that
scripts/synth-qwen writes (151,936 tokens; random weights, so its JSON strings run on to the
token limit, but its vocabulary costs what the real model's does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.bench import SYSTEM_PROMPT, command_line, machine, rotated, write_result
from daemon.config import default_threads
from daemon.engine import Engine, EngineSettings, TestHooks
from daemon.grammar import answer_format
from daemon.llamacpp import lib
from daemon.models import resolve
from daemon.sampling import Sampler

QUESTION = "Classify this alarm: hydraulic press 3 on line 2 reports oil at 95 C. Answer in JSON."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high"]},
        "stop_line": {"type": "boolean"},
        "temperature_c": {"type": "number"},
        "station": {"type": "string"},
        "action": {"type": "string"},
    },
    "required": ["severity", "stop_line", "temperature_c", "station", "action"],
}
MODES = ("free", "checked", "masked")


@dataclass(frozen=True)
class Sample:
    model: str
    mode: str
    tokens: int
    decode_tokens_per_s: float
    checked: int  # tokens the grammar allowed at the first try
    masked: int  # tokens chosen under the whole-vocabulary mask


def _sample(engine: Engine, mode: str, tokens: int) -> Sample:
    engine.grammar_check_first = mode != "masked"
    fmt = (
        None
        if mode == "free"
        else answer_format({"type": "json_schema", "schema": SCHEMA}, max_schema_bytes=8192)
    )
    result = engine.generate(
        QUESTION,
        max_tokens=tokens,
        temperature=0.0,
        on_text=lambda _text: None,
        should_stop=lambda: False,
        answer_format=fmt,
    )
    first = result.first_token_monotonic
    if first is None or result.completion_tokens < 2:
        raise RuntimeError(f"{engine.name} {mode}: {result.completion_tokens} tokens")
    rate = (result.completion_tokens - 1) / (result.end_monotonic - first)
    checked, masked = engine.grammar_counts
    return Sample(engine.name, mode, result.completion_tokens, rate, checked, masked)


def _setup_ms(engine: Engine, reps: int = 20) -> float:
    """Time to build (and free) an answer's grammar sampler: the parse of the grammar."""
    grammar = answer_format({"type": "json_schema", "schema": SCHEMA}, max_schema_bytes=8192)
    started = time.perf_counter()
    for _ in range(reps):
        Sampler(engine.vocab, temperature=0.0, seed=0, grammar=grammar.grammar).close()
    return round((time.perf_counter() - started) * 1000 / reps, 2)


def _summary(samples: list[Sample]) -> dict[str, Any]:
    by_mode = {mode: [s for s in samples if s.mode == mode] for mode in MODES}
    rates = {
        mode: statistics.median(s.decode_tokens_per_s for s in got) for mode, got in by_mode.items()
    }
    # Each repetition ran all three back to back: their ratios cancel slow drifts.
    pairs = {
        mode: statistics.median(
            s.decode_tokens_per_s / f.decode_tokens_per_s
            for s, f in zip(by_mode[mode], by_mode["free"], strict=True)
        )
        for mode in ("checked", "masked")
    }
    checked = sum(s.checked for s in by_mode["checked"])
    masked = sum(s.masked for s in by_mode["checked"])
    return {
        **{f"{mode}_tokens_per_s": round(rate, 2) for mode, rate in rates.items()},
        "ratio_checked_over_free": round(pairs["checked"], 3),
        "ratio_masked_over_free": round(pairs["masked"], 3),
        "json_tokens_median": statistics.median(s.tokens for s in by_mode["checked"]),
        "checked_first_try_share": round(checked / max(1, checked + masked), 3),
    }


def run_grammar_bench(
    *, reps: int, tokens: int, threads: int, models: list[Path], out_dir: Path
) -> dict[str, Any]:
    # ignore_eos: free answers run to exactly `tokens`; JSON answers end where their grammar does.
    engines = [
        Engine(
            EngineSettings(path, threads, threads, 2048, tokens, 0.0, SYSTEM_PROMPT, "auto"),
            TestHooks(ignore_eos=True),
        )
        for path in models
    ]
    samples: list[Sample] = []
    try:
        for engine in engines:
            for mode in MODES:  # warm each way up before measuring
                _sample(engine, mode, 8)
        setup_ms = {engine.name: _setup_ms(engine) for engine in engines}
        for rep in range(reps):
            for engine in engines:
                for mode in rotated(MODES, rep):
                    sample = _sample(engine, mode, tokens)
                    samples.append(sample)
                    print(
                        f"rep {rep + 1}/{reps} {engine.name:28} {mode:7} {sample.tokens:4} "
                        f"tokens: {sample.decode_tokens_per_s:6.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
        vocab = {engine.name: lib.llama_vocab_n_tokens(engine.vocab) for engine in engines}
    finally:
        for engine in engines:
            engine.close()
    result = {
        "command": command_line(),
        "models": [str(path) for path in models],
        "threads": threads,
        "reps": reps,
        "tokens": tokens,
        "schema": SCHEMA,
        "machine": machine(),
        "summary": {
            name: {
                "vocab": vocab[name],
                "grammar_setup_ms": setup_ms[name],
                **_summary([s for s in samples if s.model == name]),
            }
            for name in vocab
        },
        "samples": [asdict(s) for s in samples],
    }
    write_result(result, out_dir, "bench-grammar.json")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{'model':28} {'vocab':>7} {'free':>7} {'checked':>8} {'masked':>7} "
        f"{'chk/free':>8} {'mask/free':>9} {'1st try':>7}"
    ]
    for name, row in result["summary"].items():
        lines.append(
            f"{name:28} {row['vocab']:>7} {row['free_tokens_per_s']:>7} "
            f"{row['checked_tokens_per_s']:>8} {row['masked_tokens_per_s']:>7} "
            f"{row['ratio_checked_over_free']:>8} {row['ratio_masked_over_free']:>9} "
            f"{row['checked_first_try_share']:>7}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace, tokens: int) -> int:
    """`kioskd bench grammar`: the embedded (or --model) model, and --qwen if given."""
    models = [resolve(args.model).path, *([args.qwen] if args.qwen else [])]
    result = run_grammar_bench(
        reps=args.reps,
        tokens=tokens,
        threads=args.threads or default_threads(),
        models=models,
        out_dir=args.out,
    )
    print(render(result))
    print(f"full results: {args.out / 'bench-grammar.json'}")
    return 0
