"""The language model: owns the llama.cpp model and context; loads, warms up and streams tokens.

It talks to llama.cpp's C API directly (daemon.llamacpp): its own decode loop keeps the KV cache
of the prompt prefix shared with the previous question (the system prompt), and each answer gets
a fresh sampler chain, freed when the answer ends (llama-cpp-python's Llama.generate leaves a
3 MiB chain to the cyclic garbage collector per question). Tokens are detokenized one at a time
through an incremental UTF-8 decoder, so text goes out per token and never splits a character.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon import seqstate
from daemon.config import DEFAULT_EXAMPLES, ModelConfig
from daemon.framing import CompletionFrame, Example
from daemon.generation import Generation
from daemon.grammar import AnswerFormat, json_complete
from daemon.llamacpp import lib
from daemon.messages import ErrorCode, RequestError
from daemon.prompt import PromptBuilder, fallback_format
from daemon.sampling import GrammarError, GrammarMode, Sampler
from daemon.seqstate import SavedState
from daemon.stops import AnswerText
from daemon.testhooks import TestHooks

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings while a model loads
# are notes on the file ("control-looking token ... probably a bug in the model") or on the
# context it gets; they repeat at every start and there is nothing an operator can do, so they
# are DEBUG. A warning at any other time is unusual and stays visible at INFO.
_GGML_LEVELS = {3: logging.INFO, 4: logging.ERROR}
_GGML_LEVELS_LOADING = {3: logging.DEBUG, 4: logging.ERROR}
_llama_levels = _GGML_LEVELS

_EXAMPLES = tuple(Example(e["question"], e["answer"]) for e in DEFAULT_EXAMPLES)


@lib.llama_log_callback  # type: ignore[untyped-decorator]
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log lines, into Python logging (journald), instead of raw stderr."""
    try:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            llama_log.log(_llama_levels.get(level, logging.DEBUG), "%s", message)
    except Exception:  # noqa: BLE001 - an exception must never cross back into C
        return


@contextlib.contextmanager
def _model_notes_at_debug() -> Iterator[None]:
    """While a model loads, llama.cpp's warnings are notes on the file: DEBUG, not INFO."""
    global _llama_levels  # noqa: PLW0603 - the C log callback has no object to hold it
    _llama_levels = _GGML_LEVELS_LOADING
    try:
        yield
    finally:
        _llama_levels = _GGML_LEVELS


def _assign(struct: ctypes.Structure, **values: int) -> None:
    """Set fields of a llama.cpp parameter struct, refusing names it does not have: ctypes
    would store an unknown name as a plain attribute that llama.cpp never sees."""
    fields = {field[0] for field in struct._fields_}
    for name, value in values.items():
        if name not in fields:
            raise ModelLoadError(
                f"this llama-cpp-python has no {type(struct).__name__}.{name}; "
                "install the version pyproject.toml asks for"
            )
        setattr(struct, name, value)


class ModelLoadError(Exception):
    """The model file is missing or llama.cpp cannot load it."""


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
        if not settings.path.is_file():
            raise ModelLoadError(f"model file not found: {settings.path}")
        lib.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
        lib.llama_backend_init()
        with _model_notes_at_debug():
            self._model, self._ctx = self._load(settings)
        self._closed = False
        self._memory = lib.llama_get_memory(self._ctx)
        self._vocab: lib.llama_vocab_p = lib.llama_model_get_vocab(self._model)
        self._cached: list[int] = []  # the tokens whose keys and values the KV cache holds
        # Gemma 3's sliding-window layers attend to the last n_swa positions only; a saved
        # state keeps just those, so a restored cache must not be cut back (see _safe_keep).
        self._n_swa = lib.llama_model_n_swa(self._model)
        self._step = (lib.llama_token * settings.batch_tokens)()
        bos_id, eos_id = lib.llama_vocab_bos(self._vocab), lib.llama_vocab_eos(self._vocab)
        template = lib.llama_model_chat_template(self._model, None)
        add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        # Where an answer ends besides the model's end of turn (completion style: the frame's).
        self._stops: tuple[str, ...] = ()
        # For `kioskd bench grammar`: how the grammar constrains tokens, and the last answer's
        # tokens chosen without and with masking the whole vocabulary.
        self.grammar_mode = GrammarMode.CANDIDATES
        self.grammar_counts = (0, 0)
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

    @staticmethod
    def _load(settings: EngineSettings) -> tuple[lib.llama_model_p, lib.llama_context_p]:
        model_params = lib.llama_model_default_params()
        _assign(
            model_params,
            # A CPU-only build ignores it; a Jetson's CUDA build needs it to use the GPU at all.
            n_gpu_layers=settings.gpu_layers,
            # Read, not mapped: llama.cpp repacks some weights into a faster layout, and with a
            # map their original pages stay resident beside the copy.
            load_mode=lib.LLAMA_LOAD_MODE_MMAP if settings.mmap else lib.LLAMA_LOAD_MODE_NONE,
        )
        model = lib.llama_model_load_from_file(str(settings.path).encode(), model_params)
        if not model:
            raise ModelLoadError(
                f"cannot load model {settings.path}: llama.cpp could not read it "
                "(its log lines just before this one say why)"
            )
        context_params = lib.llama_context_default_params()
        _assign(
            context_params,
            n_ctx=settings.ctx,
            n_batch=settings.batch_tokens,
            n_ubatch=settings.batch_tokens,
            n_threads=settings.threads,
            n_threads_batch=settings.threads_batch,
            flash_attn_type=lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        )
        context = lib.llama_init_from_model(model, context_params)
        if not context:
            lib.llama_model_free(model)
            raise ModelLoadError(
                f"cannot load model {settings.path}: llama.cpp could not create a context of "
                f"{settings.ctx} tokens for it"
            )
        return model, context

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
        lib.llama_memory_clear(self._memory, True)
        self._cached = []

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
        keep = self._safe_keep(seqstate.common_prefix(self._cached, prefix))
        if keep < len(self._cached):
            # Answer tokens the next prompt reads differently (or never evaluated) go first,
            # so that the state is the start of the next prompt and is only ever continued.
            if keep == 0 or not lib.llama_memory_seq_rm(self._memory, -1, keep, -1):
                self.forget_prompt_cache()
                return None
            del self._cached[keep:]
        return seqstate.capture(self._ctx, self._cached)

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
        cached_tokens = self._reuse(prompt, resume)
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
        try:
            return Sampler(
                self._vocab,
                temperature=temp,
                seed=self.settings.seed,
                repeat_penalty=self.settings.repeat_penalty,
                grammar=answer_format.grammar if answer_format else None,
                mode=self.grammar_mode,
            )
        except GrammarError as exc:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"format: {exc}") from exc

    def _decode(self, prompt: list[int], sampler: Sampler) -> Generator[int, None, None]:
        """Evaluate the prompt after the part `_reuse` kept, then yield one token at a time."""
        self._evaluate(prompt[len(self._cached) :])
        while True:
            token = sampler.sample(self._ctx)
            yield token
            self._evaluate([token])

    def _reuse(self, prompt: list[int], resume: SavedState | None) -> int:
        """Keep the longest prefix of `prompt` whose state is at hand, from the KV cache or from
        `resume`; returns how many prompt tokens need no computing."""
        held = 0
        if resume is not None:
            held = resume.common_prefix(prompt)
            if held < len(resume.tokens) and self._n_swa:
                held = 0  # it would have to be cut back, which a restored state cannot be
            held = min(held, len(prompt) - 1)
        if resume is not None and held > self._cached_prefix(prompt):
            if seqstate.restore(self._ctx, resume):
                self._cached = list(resume.tokens)
            else:
                log.warning("llama.cpp refused a saved conversation state; reading it again")
                self.forget_prompt_cache()
        keep = self._safe_keep(self._cached_prefix(prompt))
        if keep > 0 and lib.llama_memory_seq_rm(self._memory, -1, keep, -1):
            del self._cached[keep:]
            return keep
        self.forget_prompt_cache()
        return 0

    def _safe_keep(self, keep: int) -> int:
        """`keep`, or 0 when cutting the cache back to it would leave sliding-window layers
        without keys that the next positions attend to: after a restore they hold only the
        last n_swa positions (measured: restored and cut back, logits off by up to 14)."""
        if keep >= len(self._cached) or not self._n_swa:
            return keep
        oldest = lib.llama_memory_seq_pos_min(self._memory, 0)
        return keep if 0 <= oldest <= max(0, keep - self._n_swa) else 0

    def _evaluate(self, tokens: list[int]) -> None:
        """Run tokens through the model, a step of at most batch_tokens at a time."""
        step = self._step
        for start in range(0, len(tokens), len(step)):
            chunk = tokens[start : start + len(step)]
            for index, token in enumerate(chunk):
                step[index] = token
            status = lib.llama_decode(self._ctx, lib.llama_batch_get_one(step, len(chunk)))
            if status != 0:
                # The cache may hold part of the step: start the next prompt from scratch.
                self.forget_prompt_cache()
                raise RuntimeError(f"llama_decode failed with status {status}")
            self._cached.extend(chunk)

    def _cached_prefix(self, prompt: list[int]) -> int:
        """How many leading prompt tokens the KV cache already holds, leaving at least one to
        evaluate (its logits pick the first token)."""
        return min(seqstate.common_prefix(self._cached, prompt), len(prompt) - 1)

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
