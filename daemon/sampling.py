"""How one answer picks its tokens: a llama.cpp sampler chain, with a grammar when the answer
must be JSON.

A grammar sampler that masks the whole vocabulary checks every token (Gemma 3: 262,144; Qwen:
151,936) against the grammar at every step. Most of the time the model's own choice is already
allowed, so this does what llama.cpp's common sampler does: sample without the grammar, check
that one token, and mask the whole vocabulary only when the grammar rejects it. Both ways are
measured in docs/benchmarks.md (`kioskd bench grammar`).
"""

from __future__ import annotations

import ctypes
import math

from daemon.llamacpp import lib

# Llama.generate's defaults, which kioskd's sampled answers have always used.
_TOP_K = 40
_TOP_P = 0.95
_MIN_P = 0.05
# How far back the repetition penalty looks.
_PENALTY_LAST_N = 64


class GrammarError(Exception):
    """llama.cpp could not build a sampler from the grammar (its log says why)."""


class Sampler:
    """One answer's sampler; `sample` picks the next token, `close` frees the C objects.

    check_first: sample, then check that token against the grammar, and mask the whole
    vocabulary only when it is rejected. False masks on every token (for the benchmark).
    """

    def __init__(
        self,
        vocab: lib.llama_vocab_p,
        *,
        temperature: float,
        seed: int,
        repeat_penalty: float = 1.0,
        grammar: str | None = None,
        check_first: bool = True,
    ) -> None:
        self._seed = seed if seed >= 0 else lib.LLAMA_DEFAULT_SEED
        self._temperature = temperature
        self._check_first = check_first
        self.checked = 0  # tokens the grammar allowed at the first try
        self.masked = 0  # tokens chosen from the whole vocabulary under the grammar's mask
        self._grammar: lib.llama_sampler_p | None = None
        self._masked_chain: lib.llama_sampler_p | None = None
        # A repetition penalty would also punish the quotes and commas that JSON repeats.
        penalty = repeat_penalty if grammar is None else 1.0
        self._chain: lib.llama_sampler_p | None = self._new_chain(
            lib.llama_vocab_n_tokens(vocab), penalty
        )
        if grammar is None:
            return
        self._grammar = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self._grammar:
            self.close()
            raise GrammarError("llama.cpp cannot parse the grammar made from this schema")
        # The grammar first, then the same choice as the free chain, as llama.cpp's resampling.
        self._masked_chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self._masked_chain, self._grammar)  # the chain owns it now
        self._add_choice(self._masked_chain)
        self._candidate = lib.llama_token_data()
        self._one = lib.llama_token_data_array(
            data=ctypes.pointer(self._candidate), size=1, selected=-1, sorted=False
        )

    def _new_chain(self, n_vocab: int, repeat_penalty: float) -> lib.llama_sampler_p:
        chain: lib.llama_sampler_p = lib.llama_sampler_chain_init(
            lib.llama_sampler_chain_default_params()
        )
        if repeat_penalty != 1.0:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(n_vocab, _PENALTY_LAST_N, repeat_penalty, 0, 0),
            )
        self._add_choice(chain)
        return chain

    def _add_choice(self, chain: lib.llama_sampler_p) -> None:
        if self._temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return
        for stage in (
            lib.llama_sampler_init_top_k(_TOP_K),
            lib.llama_sampler_init_top_p(_TOP_P, 1),
            lib.llama_sampler_init_min_p(_MIN_P, 1),
            lib.llama_sampler_init_temp(self._temperature),
            lib.llama_sampler_init_dist(self._seed),
        ):
            lib.llama_sampler_chain_add(chain, stage)

    def sample(self, ctx: lib.llama_context_p) -> int:
        """The next token from the last decoded position's logits."""
        if self._grammar is None or self._masked_chain is None:
            return int(lib.llama_sampler_sample(self._chain, ctx, -1))
        if self._check_first:
            token = int(lib.llama_sampler_sample(self._chain, ctx, -1))
            candidate = self._candidate
            candidate.id = lib.llama_token(token)
            candidate.logit, candidate.p = 1.0, 0.0
            self._one.size, self._one.selected = 1, -1
            lib.llama_sampler_apply(self._grammar, ctypes.byref(self._one))
            if candidate.logit != -math.inf:
                # Never accept a token the grammar refused: llama.cpp aborts the process on it.
                lib.llama_sampler_accept(self._grammar, token)
                self.checked += 1
                return token
        self.masked += 1
        # Samples under the grammar's mask, and the chain accepts the token into the grammar.
        return int(lib.llama_sampler_sample(self._masked_chain, ctx, -1))

    def close(self) -> None:
        for chain in (self._chain, self._masked_chain):
            if chain:
                lib.llama_sampler_free(chain)
        self._chain = self._masked_chain = self._grammar = None
