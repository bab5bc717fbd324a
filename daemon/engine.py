"""The language model: owns llama_cpp.Llama; loads, warms up and streams tokens.

Tokens come from kioskd's own decode loop over Llama.eval: it keeps the KV cache of the prompt
prefix shared with the previous question (the system prompt), picks greedy tokens with one
numpy argmax instead of llama.cpp's sampler chain (which copies every one of the vocabulary's
candidates for each token: 0.56 ms against 0.02 ms for Gemma 3's 262k tokens), and frees its
sampler when the answer ends (Llama.generate leaves a 3 MiB sampler to the cyclic garbage
collector per question). Tokens are detokenized one at a time through an incremental UTF-8
decoder, so text goes out per token and never splits a character.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import io
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from daemon.config import ModelConfig
from daemon.messages import ErrorCode, RequestError
from daemon.prompt import PromptBuilder, fallback_format
from daemon.scheduler import Generation

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings are about the
# model file and repeat at every start, so they are informational for an operator.
_GGML_LEVELS = {3: logging.INFO, 4: logging.ERROR}


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log lines, into Python logging (journald), instead of raw stderr."""
    try:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            llama_log.log(_GGML_LEVELS.get(level, logging.DEBUG), "%s", message)
    except Exception:  # noqa: BLE001 - an exception must never cross back into C
        return


class ModelLoadError(Exception):
    """The model file is missing or llama.cpp cannot load it."""


@dataclass(frozen=True)
class TestHooks:
    """Switches for the test suite and benchmarks, read from KIOSKD_TEST_* variables.

    ignore_eos: keep generating past end-of-turn, so answers have a known length.
    token_delay_ms: sleep after every token, so a request stays running long enough to
      queue, cancel or interrupt it.
    stall_file: while this file exists, generation blocks (simulates a hung worker).
    """

    ignore_eos: bool = False
    token_delay_ms: float = 0.0
    stall_file: Path | None = None

    @classmethod
    def from_env(cls) -> TestHooks:
        stall = os.environ.get("KIOSKD_TEST_STALL_FILE")
        return cls(
            ignore_eos=os.environ.get("KIOSKD_TEST_IGNORE_EOS") == "1",
            token_delay_ms=float(os.environ.get("KIOSKD_TEST_TOKEN_DELAY_MS", "0") or 0),
            stall_file=Path(stall) if stall else None,
        )

    @property
    def active(self) -> bool:
        return self.ignore_eos or self.token_delay_ms > 0 or self.stall_file is not None


@dataclass(frozen=True)
class EngineSettings:
    path: Path
    threads: int
    threads_batch: int
    ctx: int
    max_tokens: int
    temperature: float
    system_prompt: str
    chat_format: str
    seed: int = ModelConfig.seed
    batch_tokens: int = ModelConfig.batch_tokens
    mmap: bool = ModelConfig.mmap


class Engine:
    """One loaded model; `generate` must be called from one thread at a time."""

    def __init__(self, settings: EngineSettings, hooks: TestHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or TestHooks()
        self.name = settings.path.stem.lower()
        self._threads = settings.threads
        self._wanted_threads = settings.threads
        if not settings.path.is_file():
            raise ModelLoadError(f"model file not found: {settings.path}")
        # verbose=False would point file descriptor 2 at /dev/null while the model loads, and
        # swallow what other threads log meanwhile (a broker refusal, say). Instead llama.cpp's
        # log goes through _route_llama_log, and llama-cpp-python's own prints to sys.stderr
        # during loading are caught here; the logging handlers keep the real stderr.
        llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                self._llama = llama_cpp.Llama(
                    model_path=str(settings.path),
                    n_ctx=settings.ctx,
                    n_threads=settings.threads,
                    n_threads_batch=settings.threads_batch,
                    n_batch=settings.batch_tokens,
                    n_ubatch=settings.batch_tokens,
                    # Read, not mapped: llama.cpp repacks some weights into a faster layout, and
                    # with a map their original pages stay resident beside the copy.
                    use_mmap=settings.mmap,
                    seed=settings.seed if settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
                    verbose=True,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load model {settings.path}: {exc}") from exc
        self._llama.verbose = False  # no per-request prints from Llama.generate
        # verbose=True also set llama-cpp-python's own logger to DEBUG.
        logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
        model = self._llama._model
        bos_id, eos_id = self._llama.token_bos(), self._llama.token_eos()
        self._prompts = PromptBuilder(
            system_prompt=settings.system_prompt,
            embedded_template=self._llama.metadata.get("tokenizer.chat_template"),
            fallback_format=fallback_format(
                settings.chat_format, self._llama.metadata.get("general.architecture")
            ),
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
        )
        self._vocab = model.vocab
        self._n_vocab = self._llama.n_vocab()
        if self.hooks.active:
            log.warning("test hooks are active: %s", self.hooks)
        log.info(
            "model %s loaded: %d threads (%d for prompts), ctx %d, chat template from %s",
            self.name,
            settings.threads,
            settings.threads_batch,
            settings.ctx,
            self._prompts.source,
        )

    @property
    def threads(self) -> int:
        return self._wanted_threads

    def set_threads(self, threads: int) -> None:
        """Ask for a new decode thread count; the generation thread applies it at its next token."""
        self._wanted_threads = threads

    def _apply_threads(self) -> None:
        # Only the generation thread touches the llama context, so no decode sees a half change.
        threads = self._wanted_threads
        if threads != self._threads:
            llama_cpp.llama_set_n_threads(
                self._llama.ctx, threads, min(threads, self.settings.threads_batch)
            )
            self._threads = threads

    def kv_cache_bytes(self) -> int | None:
        """Size of the f16 KV cache for the whole context, from the GGUF's metadata."""
        meta = self._llama.metadata
        arch = meta.get("general.architecture", "")
        try:
            layers = int(meta[f"{arch}.block_count"])
            heads = int(meta[f"{arch}.attention.head_count"])
            kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
            head_dim = int(meta[f"{arch}.embedding_length"]) // heads
            key_dim = int(meta.get(f"{arch}.attention.key_length", head_dim))
            value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
        except (KeyError, ValueError):
            return None
        return self.settings.ctx * layers * kv_heads * (key_dim + value_dim) * 2

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def forget_prompt_cache(self) -> None:
        """Drop the cached prompt prefix, so the next prompt is evaluated in full."""
        self._llama.reset()  # type: ignore[no-untyped-call]

    def warm_up(self) -> Generation:
        """Run a short generation so the first real question does not pay for cold caches."""
        return self.generate(
            "Hello",
            max_tokens=4,
            temperature=0.0,
            on_text=lambda _text: None,
            should_stop=lambda: False,
        )

    def prompt_text(self, question: str) -> str:
        """The whole rendered prompt as text (for tools that take text, like the benchmark)."""
        parts = self._prompts.build(question)
        return parts.before + parts.question + parts.after

    def prompt_tokens(self, question: str) -> list[int]:
        parts = self._prompts.build(question)
        llama = self._llama
        return (
            llama.tokenize(parts.before.encode("utf-8"), add_bos=parts.add_bos, special=True)
            + llama.tokenize(parts.question.encode("utf-8"), add_bos=False, special=False)
            + llama.tokenize(parts.after.encode("utf-8"), add_bos=False, special=True)
        )

    def generate(
        self,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> Generation:
        """Answer `question`, calling on_text with each new piece of text as it exists."""
        settings = self.settings
        prompt = self.prompt_tokens(question)
        room = settings.ctx - len(prompt)
        if room < 1:
            raise RequestError(
                ErrorCode.INVALID_REQUEST,
                f"question: too long for the model's context ({len(prompt)} prompt tokens, "
                f"context {settings.ctx})",
            )
        limit = min(max_tokens or settings.max_tokens, settings.max_tokens, room)
        temp = settings.temperature if temperature is None else temperature
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        completion_tokens = 0
        first_token: float | None = None
        stopped = False
        hit_length = False
        self._apply_threads()
        tokens = self._decode(prompt, temp)
        try:
            for token in self._tokens(tokens):
                self._apply_threads()
                if should_stop():
                    stopped = True
                    break
                if first_token is None:
                    first_token = time.monotonic()
                if not self.hooks.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    break
                completion_tokens += 1
                text = decoder.decode(self._llama.detokenize([token]))
                if text:
                    pieces.append(text)
                    on_text(text)
                if completion_tokens >= limit:
                    hit_length = True
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail and not stopped:
            pieces.append(tail)
            on_text(tail)
        return Generation(
            text="".join(pieces),
            stopped=stopped,
            hit_length=hit_length,
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            first_token_monotonic=first_token,
            end_monotonic=time.monotonic(),
        )

    def _decode(self, prompt: list[int], temp: float) -> Generator[int, None, None]:
        """Evaluate the prompt (reusing the cached prefix), then yield one token at a time."""
        llama = self._llama
        keep = self._cached_prefix(prompt)
        if keep > 0 and llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama.n_tokens = keep
        else:
            llama.reset()  # type: ignore[no-untyped-call]
        llama.eval(prompt[llama.n_tokens :])
        sampler = None if temp == 0 else llama._init_sampler(temp=temp)
        try:
            while True:
                token = self._greedy_token() if sampler is None else sampler.sample(llama._ctx, -1)
                yield token
                llama.eval([token])
        finally:
            if sampler is not None:
                sampler.close()

    def _cached_prefix(self, prompt: list[int]) -> int:
        """How many leading prompt tokens the KV cache already holds, leaving at least one to
        evaluate (its logits pick the first token)."""
        llama = self._llama
        cached = llama.input_ids[: llama.n_tokens]
        same = 0
        for old, new in zip(cached, prompt, strict=False):
            if old != new:
                break
            same += 1
        return min(same, len(prompt) - 1)

    def _greedy_token(self) -> int:
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._llama.ctx, -1), shape=(self._n_vocab,)
        )
        return int(np.argmax(logits))

    def _tokens(self, tokens: Iterator[int]) -> Iterator[int]:
        hooks = self.hooks
        if not hooks.active:
            yield from tokens
            return
        for token in tokens:
            yield token
            if hooks.token_delay_ms:
                time.sleep(hooks.token_delay_ms / 1000)
            while hooks.stall_file is not None and hooks.stall_file.exists():
                time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._llama.close()
