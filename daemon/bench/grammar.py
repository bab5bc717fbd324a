"""`kioskd bench grammar`: decode speed of JSON answers under a grammar against free decoding.

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

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.bench.harness import bench_engine, generate_silently, interleave
from daemon.bench.results import Machine, command_line, machine
from daemon.engine import Engine
from daemon.grammar import answer_format
from daemon.llamacpp import lib
from daemon.sampling import GrammarMode, Sampler

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
class GrammarSample:
    model: str
    mode: str
    tokens: int
    decode_tokens_per_s: float
    checked: int  # tokens chosen without masking the whole vocabulary
    masked: int  # tokens chosen under the whole vocabulary's mask


def _sample(engine: Engine, mode: str, tokens: int) -> GrammarSample:
    if mode != "free":
        engine.grammar_mode = GrammarMode(mode)
    fmt = (
        None
        if mode == "free"
        else answer_format({"type": "json_schema", "schema": SCHEMA}, max_schema_bytes=8192)
    )
    result = generate_silently(engine.generate, QUESTION, max_tokens=tokens, answer_format=fmt)
    first = result.first_token_monotonic
    if first is None or result.completion_tokens < 2:
        raise RuntimeError(f"{engine.name} {mode}: {result.completion_tokens} tokens")
    rate = (result.completion_tokens - 1) / (result.end_monotonic - first)
    checked, masked = engine.grammar_counts
    return GrammarSample(engine.name, mode, result.completion_tokens, rate, checked, masked)


def _setup_ms(engine: Engine, reps: int = 20) -> float:
    """Time to build (and free) an answer's grammar sampler: the parse of the grammar."""
    grammar = answer_format({"type": "json_schema", "schema": SCHEMA}, max_schema_bytes=8192)
    started = time.perf_counter()
    for _ in range(reps):
        Sampler(engine.vocab, temperature=0.0, seed=0, grammar=grammar.grammar).close()
    return round((time.perf_counter() - started) * 1000 / reps, 2)


@dataclass(frozen=True)
class ModeFigures:
    """One grammar mode on one model: median tok/s, ratio to free decoding, share unmasked."""

    tokens_per_s: float
    ratio_over_free: float
    unmasked_share: float


@dataclass(frozen=True)
class GrammarRow:
    vocab: int
    grammar_setup_ms: float
    free_tokens_per_s: float
    modes: dict[str, ModeFigures]  # by GrammarMode value
    json_tokens_median: float

    def to_json(self) -> dict[str, Any]:
        """The keys of bench-grammar.json: {mode}_tokens_per_s, ratio_{mode}_over_free, ..."""
        out: dict[str, Any] = {
            "vocab": self.vocab,
            "grammar_setup_ms": self.grammar_setup_ms,
            "free_tokens_per_s": self.free_tokens_per_s,
        }
        for mode, figures in self.modes.items():
            out[f"{mode}_tokens_per_s"] = figures.tokens_per_s
            out[f"ratio_{mode}_over_free"] = figures.ratio_over_free
            out[f"{mode}_unmasked_share"] = figures.unmasked_share
        return out | {"json_tokens_median": self.json_tokens_median}


@dataclass(frozen=True)
class GrammarResult:
    command: str
    models: list[str]
    threads: int
    reps: int
    tokens: int
    schema: dict[str, Any]
    machine: Machine
    summary: dict[str, GrammarRow]  # by model name
    samples: list[GrammarSample]


def _row(samples: list[GrammarSample], vocab: int, setup_ms: float) -> GrammarRow:
    by_mode = {mode: [s for s in samples if s.mode == mode] for mode in MODES}
    free = by_mode["free"]
    modes = {}
    for mode in MODES[1:]:
        got = by_mode[mode]
        checked, masked = sum(s.checked for s in got), sum(s.masked for s in got)
        modes[mode] = ModeFigures(
            round(statistics.median(s.decode_tokens_per_s for s in got), 2),
            # Each repetition ran every mode back to back: their ratios cancel slow drifts.
            round(
                statistics.median(
                    s.decode_tokens_per_s / f.decode_tokens_per_s
                    for s, f in zip(got, free, strict=True)
                ),
                3,
            ),
            round(checked / max(1, checked + masked), 3),
        )
    return GrammarRow(
        vocab=vocab,
        grammar_setup_ms=setup_ms,
        free_tokens_per_s=round(statistics.median(s.decode_tokens_per_s for s in free), 2),
        modes=modes,
        json_tokens_median=statistics.median(
            s.tokens for s in by_mode[GrammarMode.CANDIDATES.value]
        ),
    )


def run_grammar(*, reps: int, tokens: int, threads: int, models: list[Path]) -> GrammarResult:
    """Every mode on every model, interleaved."""
    # ignore_eos: free answers run to exactly `tokens`; JSON answers end where their grammar does.
    engines = {str(path): bench_engine(path, threads, max_tokens=tokens) for path in models}
    try:
        for engine in engines.values():
            for mode in MODES:  # warm each way up before measuring
                _sample(engine, mode, 8)
        setup_ms = {engine.name: _setup_ms(engine) for engine in engines.values()}
        measured = interleave(
            [(path, mode) for path in engines for mode in MODES],
            reps,
            lambda cell, _rep: _sample(engines[cell[0]], cell[1], tokens),
            lambda cell, sample: (
                f"{sample.model:28} {cell[1]:10} {sample.tokens:4} tokens: "
                f"{sample.decode_tokens_per_s:6.1f} tok/s"
            ),
        )
        vocab = {e.name: lib.llama_vocab_n_tokens(e.vocab) for e in engines.values()}
    finally:
        for engine in engines.values():
            engine.close()
    samples = [sample for _cell, sample in measured]
    return GrammarResult(
        command=command_line(),
        models=[str(path) for path in models],
        threads=threads,
        reps=reps,
        tokens=tokens,
        schema=SCHEMA,
        machine=machine(),
        summary={
            name: _row([s for s in samples if s.model == name], vocab[name], setup_ms[name])
            for name in vocab
        },
        samples=samples,
    )
