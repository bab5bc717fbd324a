"""`kioskd bench grammar`: decode speed of JSON answers under a grammar against free decoding;
`kioskd bench answers`: how long the embedded model's answers are, and whether they end.

Four ways to pick each token, interleaved on every model in one run so that machine noise hits
all alike: free (no grammar), and the three GrammarModes of daemon/sampling.py: candidates (the
free sampler's top 40 checked against the grammar; what kioskd does), sampled (llama.cpp's
common sampler: one freely sampled token checked) and masked (the whole vocabulary checked at
every token). The grammar comes from a 5-field schema. Models: the embedded Gemma 3 270M
(262,144 tokens) and each GGUF named after `grammar`, such as the Qwen2.5-0.5B-shaped model
that scripts/synth-qwen writes (151,936 tokens; random weights, so its JSON strings run on to
the token limit, but its vocabulary costs what the real model's does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.bench.compare import SYSTEM_PROMPT, command_line, machine, rotated, write_result
from daemon.config import Config, default_threads
from daemon.engine import Engine, EngineSettings
from daemon.grammar import answer_format
from daemon.llamacpp import lib
from daemon.models import resolve
from daemon.sampling import GrammarMode, Sampler
from daemon.testhooks import TestHooks

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
MODES = ("free", *(mode.value for mode in GrammarMode))


@dataclass(frozen=True)
class Sample:
    model: str
    mode: str
    tokens: int
    decode_tokens_per_s: float
    checked: int  # tokens chosen without masking the whole vocabulary
    masked: int  # tokens chosen under the whole vocabulary's mask


def _sample(engine: Engine, mode: str, tokens: int) -> Sample:
    if mode != "free":
        engine.grammar_mode = GrammarMode(mode)
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
    summary: dict[str, Any] = {}
    for mode, got in by_mode.items():
        summary[f"{mode}_tokens_per_s"] = round(
            statistics.median(s.decode_tokens_per_s for s in got), 2
        )
        if mode == "free":
            continue
        # Each repetition ran every mode back to back: their ratios cancel slow drifts.
        summary[f"ratio_{mode}_over_free"] = round(
            statistics.median(
                s.decode_tokens_per_s / f.decode_tokens_per_s
                for s, f in zip(got, by_mode["free"], strict=True)
            ),
            3,
        )
        checked, masked = sum(s.checked for s in got), sum(s.masked for s in got)
        summary[f"{mode}_unmasked_share"] = round(checked / max(1, checked + masked), 3)
    summary["json_tokens_median"] = statistics.median(
        s.tokens for s in by_mode[GrammarMode.CANDIDATES.value]
    )
    return summary


def run_grammar_bench(
    *, reps: int, tokens: int, threads: int, models: list[Path], out_dir: Path
) -> dict[str, Any]:
    # ignore_eos: free answers run to exactly `tokens`; JSON answers end where their grammar does.
    engines = [
        Engine(
            EngineSettings(
                path=path,
                threads=threads,
                threads_batch=threads,
                ctx=2048,
                max_tokens=tokens,
                temperature=0.0,
                system_prompt=SYSTEM_PROMPT,
                chat_format="auto",
            ),
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
    """tok/s per mode, the ratio to free decoding, and the share of tokens chosen unmasked."""
    grammar_modes = [mode.value for mode in GrammarMode]
    lines = [
        f"{'model':24} {'vocab':>7} {'free':>7} " + " ".join(f"{m:>22}" for m in grammar_modes)
    ]
    for name, row in result["summary"].items():
        cells = [
            f"{row[f'{m}_tokens_per_s']:6.1f} ({row[f'ratio_{m}_over_free']:.2f}x, "
            f"{row[f'{m}_unmasked_share']:.0%})"
            for m in grammar_modes
        ]
        lines.append(
            f"{name:24} {row['vocab']:>7} {row['free_tokens_per_s']:7.1f} "
            + " ".join(f"{c:>22}" for c in cells)
        )
    lines.append("tok/s (ratio to free, share of tokens chosen without the whole-vocabulary mask)")
    return "\n".join(lines)


def main(args: argparse.Namespace, tokens: int) -> int:
    """`kioskd bench grammar [GGUF ...]`: the embedded (or --model) model and each GGUF named;
    `kioskd bench answers`: answer lengths."""
    mode, *more = args.mode
    if mode == "answers" and not more:
        return main_answers(args)
    if mode != "grammar":
        print("kioskd bench: modes are `grammar [GGUF ...]` and `answers`", file=sys.stderr)
        return 2
    models = [resolve(args.model).path, *(Path(path) for path in more)]
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


# --- `kioskd bench answers`: how long answers are, and whether they end by themselves --------

QUESTIONS_FILE = Path("tests/data/factory-questions.txt")
# (prompt style, repeat penalty): chat is how the embedded model was asked before the completion
# frame (its architecture's chat format, no stop strings).
ANSWER_VARIANTS = (("chat", 1.0), ("completion", 1.0), ("completion", 1.1), ("completion", 1.3))


def _quantiles(values: list[int]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4)
    return {
        "min": min(values),
        "p25": quartiles[0],
        "median": statistics.median(values),
        "p75": quartiles[2],
        "p90": statistics.quantiles(values, n=10)[8],
        "max": max(values),
    }


def run_answer_lengths(
    *, reps: int, threads: int, model: Path, questions: Path, out_dir: Path
) -> dict[str, Any]:
    """Every question `reps` times with the default model settings, per prompt style and
    repeat penalty: answer lengths, and how many ended by themselves within 120 tokens."""
    lines = questions.read_text(encoding="utf-8").splitlines()
    asked = [line for line in lines if line.strip() and not line.startswith("#")]
    defaults = Config().model
    summary: dict[str, Any] = {}
    for style, penalty in ANSWER_VARIANTS:
        engine = Engine(
            EngineSettings(
                path=model,
                threads=threads,
                threads_batch=threads,
                ctx=defaults.ctx,
                max_tokens=defaults.max_tokens,
                temperature=defaults.temperature,
                system_prompt=defaults.system_prompt,
                chat_format=defaults.chat_format,
                prompt_style=style,
                repeat_penalty=penalty,
            )
        )
        lengths, ended = [], 0
        try:
            for _rep in range(reps):
                for question in asked:
                    answer = engine.generate(
                        question,
                        max_tokens=None,
                        temperature=None,
                        on_text=lambda _text: None,
                        should_stop=lambda: False,
                    )
                    lengths.append(answer.completion_tokens)
                    ended += not answer.hit_length and answer.completion_tokens <= 120
        finally:
            engine.close()
        name = f"{style}, repeat_penalty {penalty}"
        summary[name] = {
            "answers": len(lengths),
            "stop_within_120_share": round(ended / len(lengths), 3),
            "length_cut": sum(n >= defaults.max_tokens for n in lengths),
            "completion_tokens": _quantiles(lengths),
        }
        print(f"{name:32} {summary[name]}", file=sys.stderr, flush=True)
    result = {
        "command": command_line(),
        "model": str(model),
        "questions": len(asked),
        "reps": reps,
        "max_tokens": defaults.max_tokens,
        "temperature": defaults.temperature,
        "summary": summary,
    }
    write_result(result, out_dir, "bench-answers.json")
    return result


def main_answers(args: argparse.Namespace) -> int:
    """`kioskd bench answers`: the factory questions, before and after the completion frame."""
    result = run_answer_lengths(
        reps=args.reps,
        threads=args.threads or default_threads(),
        model=resolve(args.model).path,
        questions=QUESTIONS_FILE,
        out_dir=args.out,
    )
    for name, row in result["summary"].items():
        tokens = row["completion_tokens"]
        print(
            f"{name:32} stop within 120: {row['stop_within_120_share']:6.1%}  tokens min "
            f"{tokens['min']} p25 {tokens['p25']} median {tokens['median']} p75 {tokens['p75']} "
            f"p90 {tokens['p90']} max {tokens['max']}"
        )
    print(f"full results: {args.out / 'bench-answers.json'}")
    return 0
