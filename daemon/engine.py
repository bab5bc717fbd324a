"""The language model: owns the llama.cpp model and context; loads, warms up and streams tokens.

It talks to llama.cpp's C API directly (daemon.llamacpp): its own decode loop keeps the KV cache
of the prompt prefix shared with the previous question (the system prompt), and each answer gets
a fresh sampler chain, freed when the answer ends (llama-cpp-python's Llama.generate leaves a
3 MiB chain to the cyclic garbage collector per question). Tokens are detokenized one at a time
through an incremental UTF-8 decoder, so text goes out per token and never splits a character.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.config import DEFAULT_EXAMPLES, ModelConfig
from daemon.framing import CompletionFrame, Example
from daemon.generation import Generation
from daemon.grammar import AnswerFormat, json_complete
from daemon.kvcache import PromptCache
from daemon.llamacpp import lib
from daemon.messages import ErrorCode, RequestError
from daemon.modelload import ModelLoadError, load_model
from daemon.prompt import PromptBuilder, fallback_format
from daemon.sampling import GrammarError, GrammarMode, Sampler
from daemon.seqstate import SavedState
from daemon.stops import AnswerText
from daemon.testhooks import TestHooks
from daemon.vocabindex import VocabIndex

# ModelLoadError comes from daemon.modelload; it is the engine's error for its callers too.
__all__ = ["Engine", "EngineSettings", "ModelLoadError"]

log = logging.getLogger(__name__)

_EXAMPLES = tuple(Example(e["question"], e["answer"]) for e in DEFAULT_EXAMPLES)


@dataclass(frozen=True, kw_only=True)
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
    prompt_style: str = ModelConfig.prompt_style
    examples: tuple[Example, ...] = _EXAMPLES
    stop: tuple[str, ...] = ()
    repeat_penalty: float = ModelConfig.repeat_penalty
    gpu_layers: int = ModelConfig.gpu_layers


class Engine:
    """One loaded model; `generate` must be called from one thread at a time."""

    def __init__(self, settings: EngineSettings, hooks: TestHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or TestHooks()
        self.name = settings.path.stem.lower()
        self._threads = settings.threads
        self._wanted_threads = settings.threads
        self._model, self._ctx = load_model(
            settings.path,
            ctx=settings.ctx,
            batch_tokens=settings.batch_tokens,
            threads=settings.threads,
            threads_batch=settings.threads_batch,
            mmap=settings.mmap,
            gpu_layers=settings.gpu_layers,
        )
        self._closed = False
        self._vocab: lib.llama_vocab_p = lib.llama_model_get_vocab(self._model)
        self._cache = PromptCache(self._ctx, self._model, batch_tokens=settings.batch_tokens)
        bos_id, eos_id = lib.llama_vocab_bos(self._vocab), lib.llama_vocab_eos(self._vocab)
        template = lib.llama_model_chat_template(self._model, None)
        add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        # Where an answer ends besides the model's end of turn (completion style: the frame's).
        self._stops: tuple[str, ...] = ()
        # For `kioskd bench grammar`: how the grammar constrains tokens, and the last answer's
        # tokens chosen without and with masking the whole vocabulary.
        self.grammar_mode = GrammarMode.CANDIDATES
        self.grammar_counts = (0, 0)
        self._vocab_index: VocabIndex | None = None  # built at the first JSON answer
        self._prompts: PromptBuilder | CompletionFrame
        style = settings.prompt_style
        if style == "completion" or (style == "auto" and not template):
            self._prompts = CompletionFrame(
                system_prompt=settings.system_prompt, examples=settings.examples, add_bos=add_bos
            )
            self._stops = self._prompts.stops
        else:
            self._prompts = PromptBuilder(
                system_prompt=settings.system_prompt,
                embedded_template=template.decode("utf-8", "replace") if template else None,
                fallback_format=fallback_format(
                    settings.chat_format, self.metadata("general.architecture")
                ),
                bos_token=self._token_text(bos_id),
                eos_token=self._token_text(eos_id),
                add_bos=add_bos,
            )
        if self.hooks.active:
            log.warning("test hooks are active: %s", self.hooks)
        log.info(
            "model %s loaded: %d threads (%d for prompts), ctx %d, prompt from %s",
            self.name,
            settings.threads,
            settings.threads_batch,
            settings.ctx,
            self._prompts.source,
        )

    def metadata(self, key: str) -> str | None:
        """One of the GGUF's metadata values, as text."""
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = lib.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.value.decode("utf-8", "replace")
            size = length + 1

    @property
    def vocab(self) -> lib.llama_vocab_p:
        return self._vocab

    def _token_text(self, token: int) -> str:
        if token == lib.LLAMA_TOKEN_NULL:
            return ""
        text = lib.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

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
            lib.llama_set_n_threads(self._ctx, threads, min(threads, self.settings.threads_batch))
            self._threads = threads

    def kv_cache_bytes(self) -> int | None:
        """Size of the f16 KV cache for the whole context, from the GGUF's metadata."""
        arch = self.metadata("general.architecture") or ""
        try:
            layers = int(self.metadata(f"{arch}.block_count") or "")
            heads = int(self.metadata(f"{arch}.attention.head_count") or "")
            kv_heads = int(self.metadata(f"{arch}.attention.head_count_kv") or heads)
            head_dim = int(self.metadata(f"{arch}.embedding_length") or "") // heads
            key_dim = int(self.metadata(f"{arch}.attention.key_length") or head_dim)
            value_dim = int(self.metadata(f"{arch}.attention.value_length") or head_dim)
        except ValueError:
            return None
        return self.settings.ctx * layers * kv_heads * (key_dim + value_dim) * 2

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; with `special`, control-token text becomes control tokens."""
        data = text.encode("utf-8")
        size = len(data) + 2
        while True:
            tokens = (lib.llama_token * size)()
            count = lib.llama_tokenize(self._vocab, data, len(data), tokens, size, add_bos, special)
            if count >= 0:
                return list(tokens[:count])
            size = -count

    def _piece(self, token: int) -> bytes:
        """The bytes of one token as text; control tokens have none."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = lib.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
            if length >= 0:
                return buffer.raw[:length]
            size = -length

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, special=False))

    def forget_prompt_cache(self) -> None:
        """Drop the cached prompt prefix, so the next prompt is evaluated in full."""
        self._cache.forget()

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

    def prompt_tokens(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The prompt of `question` after the earlier (question, answer) turns of `history`."""
        rendered = self._prompts.build_turns(question, history)
        return self._tokens_of(rendered.segments, add_bos=rendered.add_bos)

    def history_tokens(self, history: Sequence[tuple[str, str]]) -> list[int]:
        """The tokens every next prompt of a conversation starts with: up to its question."""
        rendered = self._prompts.build_turns("", history)
        return self._tokens_of(rendered.segments[:-2], add_bos=rendered.add_bos)

    def _tokens_of(self, segments: Sequence[tuple[str, bool]], *, add_bos: bool) -> list[int]:
        tokens: list[int] = []
        for text, template in segments:
            tokens += self.tokenize(text, special=template, add_bos=add_bos and not tokens)
        return tokens

    @property
    def template_source(self) -> str:
        """The chat template in use, for telling whether a saved model state still fits."""
        return self._prompts.template_text

    def save_sequence(self, prefix: list[int]) -> SavedState | None:
        """A copy of the model state of `prefix` (a conversation's next prompt up to its
        question), or of as much of it as the KV cache holds; None: it holds none of it."""
        return self._cache.save(prefix)

    def generate(
        self,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
        stop: Sequence[str] = (),
        answer_format: AnswerFormat | None = None,
        history: Sequence[tuple[str, str]] = (),
        resume: SavedState | None = None,
        prompt: list[int] | None = None,
    ) -> Generation:
        """Answer `question`, calling on_text with each new piece of text as it can be shown
        (stop strings and leading white space are not).

        `history`: earlier turns of its conversation; `resume`: their saved model state, loaded
        when it holds more of the prompt than the KV cache does now; `prompt`: the tokens of
        question and history when the caller has them already.
        """
        settings = self.settings
        if prompt is None:
            prompt = self.prompt_tokens(question, history)
        limit = self._answer_limit(len(prompt), max_tokens)
        temp = settings.temperature if temperature is None else temperature
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The frame's stops end a prose answer as end-of-turn ends a chat model's (so the
        # ignore_eos hook skips them too); a JSON answer ends where its grammar does.
        frame_stops = () if answer_format or self.hooks.ignore_eos else self._stops
        answer = AnswerText((*frame_stops, *settings.stop, *stop), on_text)
        written: list[str] = []  # all text, for telling when a JSON answer is complete
        completion_tokens = 0
        first_token: float | None = None
        stopped = False
        hit_length = False
        self._apply_threads()
        cached_tokens = self._cache.reuse(prompt, resume)
        sampler = self._sampler(temp, answer_format)
        tokens = self._decode(prompt, sampler)
        try:
            for token in self._tokens(tokens):
                self._apply_threads()
                if should_stop():
                    stopped = True
                    break
                if first_token is None:
                    first_token = time.monotonic()
                if not self.hooks.ignore_eos and lib.llama_vocab_is_eog(self._vocab, token):
                    break
                completion_tokens += 1
                text = decoder.decode(self._piece(token))
                if text and answer.add(text):
                    break
                written.append(text)
                if answer_format and json_complete("".join(written)):
                    break
                if completion_tokens >= limit:
                    hit_length = True
                    break
        finally:
            tokens.close()
            self.grammar_counts = (sampler.checked, sampler.masked)
            sampler.close()
        tail = decoder.decode(b"", final=True)
        if tail and not stopped:
            answer.add(tail)
        answer.finish()  # what was held back for a stop string, whatever ended the answer
        parsed, json_error = None, None
        if answer_format and not stopped and not hit_length:
            parsed, json_error = answer_format.check(answer.text)
        return Generation(
            text=answer.text,
            stopped=stopped,
            hit_length=hit_length,
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            first_token_monotonic=first_token,
            end_monotonic=time.monotonic(),
            json=parsed,
            json_error=json_error,
            cached_tokens=cached_tokens,
        )

    def _answer_limit(self, prompt_tokens: int, max_tokens: int | None) -> int:
        settings = self.settings
        room = settings.ctx - prompt_tokens
        if room < 1:
            raise RequestError(
                ErrorCode.INVALID_REQUEST,
                f"question: too long for the model's context ({prompt_tokens} prompt tokens, "
                f"context {settings.ctx})",
            )
        return min(max_tokens or settings.max_tokens, settings.max_tokens, room)

    def _sampler(self, temp: float, answer_format: AnswerFormat | None) -> Sampler:
        if answer_format is not None and self._vocab_index is None:
            self._vocab_index = VocabIndex(self._vocab)
        try:
            return Sampler(
                self._vocab,
                temperature=temp,
                seed=self.settings.seed,
                repeat_penalty=self.settings.repeat_penalty,
                grammar=answer_format.grammar if answer_format else None,
                mode=self.grammar_mode,
                index=self._vocab_index,
            )
        except GrammarError as exc:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"format: {exc}") from exc

    def _decode(self, prompt: list[int], sampler: Sampler) -> Generator[int, None, None]:
        """Evaluate the prompt after the part the cache kept, then yield one token at a time."""
        self._evaluate(prompt[len(self._cache.tokens) :])
        while True:
            token = sampler.sample(self._ctx)
            yield token
            self._evaluate([token])

    def _evaluate(self, tokens: list[int]) -> None:
        """Run tokens through the model (the conversation benchmark times prefill with it)."""
        self._cache.evaluate(tokens)

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
        """Free the context and the model; the engine cannot be used after."""
        if not self._closed:
            self._closed = True
            lib.llama_free(self._ctx)
            lib.llama_model_free(self._model)
