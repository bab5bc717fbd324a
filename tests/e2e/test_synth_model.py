"""The production model's architecture (qwen2, byte-level BPE, ChatML) with random weights."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from daemon import testhooks
from daemon.bench.synth import qwen_vocabulary, tiny_qwen2
from daemon.engine import Engine
from tests.support.daemon import DaemonFactory
from tests.support.engines import small_settings
from tests.support.mqtt_client import TestClient, assert_well_formed


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    tiny_qwen2(path)
    return path


def test_merges_are_rebuilt_from_the_token_ranks(tmp_path: Path) -> None:
    ranked = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"bc", b" a"]
    tiktoken = tmp_path / "ranks.tiktoken"
    tiktoken.write_text(
        "".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(ranked))
    )
    vocabulary = qwen_vocabulary(tiktoken, 300)
    # "abc" may only use merges ranked before it: a+b first, then ab+c (not a+bc: bc is later).
    assert vocabulary.merges == ["a b", "ab c", "b c", "Ġ a"]
    assert vocabulary.tokens[256:260] == ["ab", "abc", "bc", "Ġa"]  # a space is stored as Ġ
    assert vocabulary.tokens[vocabulary.eos_id] == "<|im_end|>"
    assert vocabulary.tokens[260] == "<|endoftext|>" == vocabulary.tokens[vocabulary.pad_id]
    assert len(vocabulary.tokens) == len(vocabulary.token_types) == 300
    assert vocabulary.tokens[-1] == "[PAD299]"


def test_the_engine_reads_a_qwen2_model_with_its_chatml_template(qwen2_path: Path) -> None:
    engine = Engine(
        small_settings(qwen2_path, system_prompt="Be brief."),
        testhooks.TestHooks(ignore_eos=True),
    )
    try:
        assert engine.prompt_text("Hi") == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        tokens = engine.prompt_tokens("Hi")
        im_start = engine.tokenize("<|im_start|>", special=True)
        assert len(im_start) == 1  # a control token, not its characters
        assert tokens.count(im_start[0]) == 3
        answer = engine.generate(
            "Hi", max_tokens=8, temperature=0.0, on_text=lambda _t: None, should_stop=lambda: False
        )
        assert answer.completion_tokens == 8
    finally:
        engine.close()


def test_kioskd_streams_answers_from_a_qwen2_model(
    start_daemon: DaemonFactory, client: TestClient, qwen2_path: Path
) -> None:
    daemon = start_daemon(
        {"model": {"path": str(qwen2_path), "max_tokens": 6}},
        env={"KIOSKD_TEST_IGNORE_EOS": "1"},
    )
    client.subscribe(daemon.topic("answer/q1"))
    client.publish(daemon.topic("ask"), {"id": "q1", "question": "Name a colour."})
    done = assert_well_formed(client.stream(daemon.topic("answer/q1")), "q1")
    assert done["type"] == "done"
    assert done["usage"]["completion_tokens"] == 6
    assert done["finish_reason"] == "length"
