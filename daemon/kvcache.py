"""The KV cache of the model's context: which tokens it holds, and reuse of a prompt's prefix.

An answer keeps the longest prefix of its prompt whose keys and values are at hand (in the cache
from the last answer, or in a conversation's saved state) and evaluates only the rest, a step of
batch_tokens at a time. Only the generation thread calls it, as only it touches the context.
"""

from __future__ import annotations

import logging

from daemon import seqstate
from daemon.llamacpp import lib
from daemon.seqstate import SavedState

log = logging.getLogger(__name__)


class PromptCache:
    """The tokens a llama.cpp context's KV cache holds, kept in step with the cache itself."""

    def __init__(
        self, ctx: lib.llama_context_p, model: lib.llama_model_p, *, batch_tokens: int
    ) -> None:
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self.tokens: list[int] = []  # the tokens whose keys and values the KV cache holds
        # Gemma 3's sliding-window layers attend to the last n_swa positions only; a saved
        # state keeps just those, so a restored cache must not be cut back (see _safe_keep).
        self._n_swa = lib.llama_model_n_swa(model)
        self._step = (lib.llama_token * batch_tokens)()

    def forget(self) -> None:
        """Drop the cached prompt prefix, so the next prompt is evaluated in full."""
        lib.llama_memory_clear(self._memory, True)
        self.tokens = []

    def save(self, prefix: list[int]) -> SavedState | None:
        """A copy of the model state of `prefix` (a conversation's next prompt up to its
        question), or of as much of it as the KV cache holds; None: it holds none of it."""
        keep = self._safe_keep(seqstate.common_prefix(self.tokens, prefix))
        if keep < len(self.tokens):
            # Answer tokens the next prompt reads differently (or never evaluated) go first,
            # so that the state is the start of the next prompt and is only ever continued.
            if keep == 0 or not lib.llama_memory_seq_rm(self._memory, -1, keep, -1):
                self.forget()
                return None
            del self.tokens[keep:]
        return seqstate.capture(self._ctx, self.tokens)

    def reuse(self, prompt: list[int], resume: SavedState | None) -> int:
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
                self.tokens = list(resume.tokens)
            else:
                log.warning("llama.cpp refused a saved conversation state; reading it again")
                self.forget()
        keep = self._safe_keep(self._cached_prefix(prompt))
        if keep > 0 and lib.llama_memory_seq_rm(self._memory, -1, keep, -1):
            del self.tokens[keep:]
            return keep
        self.forget()
        return 0

    def evaluate(self, tokens: list[int]) -> None:
        """Run tokens through the model, a step of at most batch_tokens at a time."""
        step = self._step
        for start in range(0, len(tokens), len(step)):
            chunk = tokens[start : start + len(step)]
            for index, token in enumerate(chunk):
                step[index] = token
            status = lib.llama_decode(self._ctx, lib.llama_batch_get_one(step, len(chunk)))
            if status != 0:
                # The cache may hold part of the step: start the next prompt from scratch.
                self.forget()
                raise RuntimeError(f"llama_decode failed with status {status}")
            self.tokens.extend(chunk)

    def _safe_keep(self, keep: int) -> int:
        """`keep`, or 0 when cutting the cache back to it would leave sliding-window layers
        without keys that the next positions attend to: after a restore they hold only the
        last n_swa positions (measured: restored and cut back, logits off by up to 14)."""
        if keep >= len(self.tokens) or not self._n_swa:
            return keep
        oldest = lib.llama_memory_seq_pos_min(self._memory, 0)
        return keep if 0 <= oldest <= max(0, keep - self._n_swa) else 0

    def _cached_prefix(self, prompt: list[int]) -> int:
        """How many leading prompt tokens the KV cache already holds, leaving at least one to
        evaluate (its logits pick the first token)."""
        return min(seqstate.common_prefix(self.tokens, prompt), len(prompt) - 1)
