"""A conversation's saved model state on the real engine and embedded model: restored, it
answers exactly as the state it was saved from; it is never cut back (Gemma 3's sliding-window
layers keep only the last window in a saved state); another model's state is refused."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daemon import seqstate, testhooks
from daemon.bench.synth import tiny_qwen2
from daemon.engine import Engine
from daemon.generation import Generation
from tests.support.engines import small_settings

# Three long turns: more than Gemma 3's 512-position window, so that a saved state is partial.
LONG = (
    "Alarm log from press {n}: hydraulic pressure dropped from 180 bar to 95 bar within two "
    "seconds while the ram was moving down; the oil temperature read 61 C and the pump motor "
    "current rose to 14 A. The same alarm came twice yesterday. What should I check first?"
)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    settings = small_settings(model_path, threads=2, threads_batch=2, ctx=2048, max_tokens=128)
    engine = Engine(settings, testhooks.TestHooks(ignore_eos=True))
    yield engine
    engine.close()


def _answer(
    engine: Engine,
    question: str,
    history: tuple[tuple[str, str], ...] = (),
    resume: seqstate.SavedState | None = None,
    tokens: int = 24,
) -> Generation:
    return engine.generate(
        question,
        max_tokens=tokens,
        temperature=0.0,
        on_text=lambda _text: None,
        should_stop=lambda: False,
        history=history,
        resume=resume,
    )


History = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def conversation(engine: Engine) -> tuple[History, seqstate.SavedState, Generation]:
    """Three turns of about 190 tokens each (more than 512 in all), the state saved after
    them, and the next turn's answer back to back, from the very cache the state was copied
    from."""
    history: History = ()
    for number in range(3):
        question = LONG.format(n=number) * 2  # prompts are read faster than answers written
        history = (*history, (question, _answer(engine, question, history, tokens=48).text))
    state = engine.save_sequence(engine.history_tokens(history))
    assert state is not None
    assert len(state.tokens) > 512, "longer than the sliding window"
    return history, state, _answer(engine, "Summarise it.", history)


def test_a_restored_state_answers_as_the_cache_it_was_saved_from(
    engine: Engine, conversation: tuple[History, seqstate.SavedState, Generation]
) -> None:
    history, state, back_to_back = conversation
    assert back_to_back.cached_tokens == len(state.tokens)
    _answer(engine, "Where is the first aid kit?")  # the cache now holds another prompt
    restored = _answer(engine, "Summarise it.", history, resume=state)
    assert restored.cached_tokens == len(state.tokens)
    assert restored.text == back_to_back.text


def test_a_restored_cache_is_not_cut_back_but_computed_again(
    engine: Engine, conversation: tuple[History, seqstate.SavedState, Generation]
) -> None:
    history, state, _ = conversation
    _answer(engine, "Where is the first aid kit?")
    _answer(engine, "Summarise it.", history, resume=state)
    # This prompt shares only the system prompt with the restored cache.
    after = _answer(engine, "Which gloves for the press?")
    engine.forget_prompt_cache()
    cold = _answer(engine, "Which gloves for the press?")
    assert after.cached_tokens == 0
    assert after.text == cold.text
    # A prompt that leaves the saved state part way is not restored either.
    changed = (*history[:2], (history[2][0], "A different answer."))
    _answer(engine, "Where is the first aid kit?")
    partial = _answer(engine, "Summarise it.", changed, resume=state)
    assert partial.cached_tokens < len(engine.history_tokens(history[:2]))


def test_another_models_state_is_refused(
    conversation: tuple[History, seqstate.SavedState, Generation], tmp_path: Path
) -> None:
    _, state, _ = conversation
    history = (("Hi?", "Hello."),)
    path = tmp_path / "tiny-qwen2.gguf"
    tiny_qwen2(path)
    other = Engine(small_settings(path, ctx=2048))
    try:
        assert not seqstate.restore(other._ctx, state)
        # Its own generation goes on from nothing, and answers.
        fake = seqstate.SavedState(tuple(other.prompt_tokens("x", history)[:10]), state.data)
        answer = other.generate(
            "Summarise it.",
            max_tokens=4,
            temperature=0.0,
            on_text=lambda _text: None,
            should_stop=lambda: False,
            history=history,
            resume=fake,
        )
        assert answer.completion_tokens > 0
        assert answer.cached_tokens == 0
    finally:
        other.close()


def test_a_dropped_state_gives_its_memory_back_at_once(engine: Engine) -> None:
    # With the cyclic collector off, a state kept alive by a reference cycle would show.
    engine.forget_prompt_cache()
    _answer(engine, "Which gloves for the press? " * 4, tokens=16)
    process = psutil.Process()
    gc.disable()
    try:
        before = process.memory_info().rss
        sizes = []
        for _ in range(20):
            state = seqstate.capture(engine._ctx, engine._cache.tokens)
            assert state is not None
            sizes.append(state.nbytes)
            assert seqstate.restore(engine._ctx, state)
            del state
        grown = process.memory_info().rss - before
    finally:
        gc.enable()
    assert sum(sizes) > 10 * 2**20
    assert grown < max(sizes) + 2**20, f"{grown / 2**20:.1f} MiB kept"
