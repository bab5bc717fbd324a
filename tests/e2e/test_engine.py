"""The engine's own decode loop against llama-cpp-python's, on the embedded model."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import psutil
import pytest

from daemon import testhooks
from daemon.bench.harness import raw_llama
from daemon.engine import Engine
from daemon.generation import Generation
from tests.support.engines import small_settings

QUESTIONS = ("What is a PLC?", "Name three safety rules.", "What is a PLC? Explain it.")


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    settings = small_settings(model_path, ctx=1024, max_tokens=64)
    engine = Engine(settings, testhooks.TestHooks(ignore_eos=True))
    yield engine
    engine.close()


def _answer(engine: Engine, question: str, tokens: int, temperature: float = 0.0) -> Generation:
    return engine.generate(
        question,
        max_tokens=tokens,
        temperature=temperature,
        on_text=lambda _text: None,
        should_stop=lambda: False,
    )


@pytest.fixture(scope="module")
def reference(engine: Engine) -> Iterator[llama_cpp.Llama]:
    """llama-cpp-python's own loop on the same model, loaded in the same process as the engine."""
    # The engine's settings read the file rather than map it: a map would spoil the test that
    # the engine maps no file.
    assert not engine.settings.mmap
    llama = raw_llama(engine.settings)
    yield llama
    llama.close()


def _reference(llama: llama_cpp.Llama, engine: Engine, question: str, tokens: int) -> str:
    """The same answer from Llama.generate with llama.cpp's greedy sampler (on the CPU)."""
    produced: list[int] = []
    # Llama.generate would reuse the prompt prefix it holds from the last question; evaluating a
    # prompt in other steps changes the last bits of the logits, so both sides start cold.
    llama.reset()
    stream = llama.generate(engine.prompt_tokens(question), temp=0.0, reset=True)
    for token in stream:
        produced.append(token)
        if len(produced) >= tokens:
            break
    stream.close()
    return str(llama.detokenize(produced).decode("utf-8", "replace"))


def test_greedy_answers_match_llama_cpp_pythons(engine: Engine, reference: llama_cpp.Llama) -> None:
    for question in QUESTIONS:
        engine.forget_prompt_cache()
        # The answer's leading white space is not part of it (docs/protocol.md).
        reference_text = _reference(reference, engine, question, 32).lstrip()
        assert _answer(engine, question, 32).text == reference_text


def test_an_answer_after_the_cached_prefix_matches_a_cold_one(engine: Engine) -> None:
    engine.forget_prompt_cache()
    cold = _answer(engine, QUESTIONS[0], 24).text
    # Another question, a cut-short answer and a repeat each leave a different cache behind.
    _answer(engine, QUESTIONS[1], 24)
    assert _answer(engine, QUESTIONS[0], 24).text == cold
    engine.generate(
        QUESTIONS[2],
        max_tokens=24,
        temperature=0.0,
        on_text=lambda _text: None,
        should_stop=iter([False, False, True]).__next__,
    )
    assert _answer(engine, QUESTIONS[0], 24).text == cold
    assert _answer(engine, QUESTIONS[0], 24).text == cold


def test_sampled_answers_free_their_sampler_at_once(engine: Engine) -> None:
    # Each sampler chain holds a copy of the whole vocabulary's candidates (3 MiB for
    # Gemma 3); with the cyclic collector off, one left for it per question would show.
    process = psutil.Process()
    _answer(engine, QUESTIONS[0], 2, temperature=0.7)
    gc.disable()
    try:
        before = process.memory_info().rss
        for question in QUESTIONS * 4:
            assert _answer(engine, question, 2, temperature=0.7).completion_tokens == 2
        grown_mib = (process.memory_info().rss - before) / 2**20
    finally:
        gc.enable()
    assert grown_mib < 6, f"RSS grew {grown_mib:.1f} MiB over 12 sampled answers"


def _mapped_files() -> set[str]:
    return {m.path for m in psutil.Process().memory_maps(grouped=True)}


def test_the_weights_are_read_into_memory_unless_mmap_is_set(
    engine: Engine, model_path: Path
) -> None:
    # With a map, the weights llama.cpp repacks would also stay resident in their file layout.
    path = str(model_path.resolve())
    assert path not in _mapped_files()
    mapped = Engine(dataclasses.replace(engine.settings, mmap=True), engine.hooks)
    try:
        assert path in _mapped_files()
        assert _answer(mapped, QUESTIONS[0], 8).text == _answer(engine, QUESTIONS[0], 8).text
    finally:
        mapped.close()
    assert path not in _mapped_files()


def test_a_smaller_batch_touches_less_scratch_memory_on_a_long_prompt(model_path: Path) -> None:
    question = " ".join(QUESTIONS * 30)  # 553 prompt tokens: a full step at 512 and at 128
    growth_mib = {}
    for batch_tokens in (512, 128):
        settings = small_settings(model_path, ctx=1024, max_tokens=1, batch_tokens=batch_tokens)
        engine = Engine(settings)
        try:
            before = psutil.Process().memory_info().rss
            assert _answer(engine, question, 1).completion_tokens == 1
            growth_mib[batch_tokens] = (psutil.Process().memory_info().rss - before) / 2**20
        finally:
            engine.close()
    assert growth_mib[128] < growth_mib[512] - 8, growth_mib


_IMPORT_PROBE = """
import sys
from pathlib import Path

from daemon.engine import Engine, EngineSettings

engine = Engine(EngineSettings(path=Path(sys.argv[1]), threads=1, threads_batch=1, ctx=256,
    max_tokens=4, temperature=0.7, system_prompt="Be brief.", chat_format="auto"))
answer = engine.generate(
    "Hi", max_tokens=4, temperature=0.7, on_text=lambda _t: None, should_stop=lambda: False
)
heavy = [m for m in ("numpy", "jinja2", "diskcache", "llama_cpp.llama") if m in sys.modules]
print(answer.completion_tokens > 0, heavy)  # the frame may end a sampled answer early

import llama_cpp  # the whole package still loads afterwards, on the very same bindings
from daemon.llamacpp import lib

print(llama_cpp.llama_cpp is lib, callable(llama_cpp.Llama))
"""


def test_the_engine_loads_llama_cpp_pythons_bindings_and_nothing_heavier(
    model_path: Path,
) -> None:
    # numpy, jinja2 and diskcache come with llama-cpp-python's Llama class: 15.6 MiB of RSS.
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(model_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == ["True []", "True True"]
