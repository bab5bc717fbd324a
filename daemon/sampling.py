"""How one answer picks its tokens: a llama.cpp sampler chain, with a grammar when the answer
must be JSON.

A grammar sampler that masks the whole vocabulary checks every token (Gemma 3: 262,144; Qwen:
151,936) against the grammar at every step: on the embedded model that cost more than the
model's own decoding. llama.cpp's common sampler samples freely first and checks only that one
token, masking the whole vocabulary when it is rejected. A small model that has not seen the
schema is rejected often, though (it cannot guess the property names), so kioskd checks the
2048 likeliest tokens instead, and the free sampler's own chain chooses among those the grammar
allows. That is the choice the whole-vocabulary mask gives whenever 40 or more of them are
allowed (the chain keeps the top 40; with fewer, only tokens less likely than all the checked
ones are missing), and exactly the greedy choice whenever one is. When none is, the grammar
usually stands between two values and allows a few tokens only: the vocabulary groups that may
hold them (daemon/vocabindex.py) are checked in full, which gives exactly the whole-vocabulary
mask's choice at a few percent of its cost. Where the groups are many (the grammar allows much),
the 16384 likeliest are checked, and only then the whole vocabulary. All the ways are measured
in docs/benchmarks.md (`kioskd bench grammar`).
"""

from __future__ import annotations

import ctypes
import math
from enum import StrEnum
from typing import Any

from daemon.llamacpp import lib
from daemon.vocabindex import VocabIndex

# Llama.generate's defaults, which kioskd's sampled answers have always used.
_TOP_K = 40
_TOP_P = 0.95
_MIN_P = 0.05
# How far back the repetition penalty looks.
_PENALTY_LAST_N = 64
# How many of the likeliest tokens are checked against the grammar, step by step, before the
# whole vocabulary is. On the embedded model the first step held an allowed token for 89 % of
# a JSON answer's tokens, the second for most of the rest: the next letters of a property name
# the model did not expect (measured for docs/benchmarks.md).
CANDIDATE_STEPS = (2048, 16384)


class GrammarMode(StrEnum):
    """How a grammar constrains each token (all four give grammatical answers)."""

    CANDIDATES = "candidates"  # the likeliest 2048, the groups, 16384; the whole vocabulary if none
    GROUPS = "groups"  # the vocabulary groups the grammar may allow; the whole if they are many
    SAMPLED = "sampled"  # llama.cpp's common sampler: one token checked; the whole if rejected
    MASKED = "masked"  # the whole vocabulary checked at every token


class GrammarError(Exception):
    """llama.cpp could not build a sampler from the grammar (its log says why)."""


class Sampler:
    """One answer's sampler; `sample` picks the next token, `close` frees the C objects."""

    def __init__(
        self,
        vocab: lib.llama_vocab_p,
        *,
        temperature: float,
        seed: int,
        repeat_penalty: float = 1.0,
        grammar: str | None = None,
        mode: GrammarMode = GrammarMode.CANDIDATES,
        index: VocabIndex | None = None,
    ) -> None:
        self._seed = seed if seed >= 0 else lib.LLAMA_DEFAULT_SEED
        self._temperature = temperature
        self._mode = mode
        self.checked = 0  # tokens chosen without masking the whole vocabulary
        self.masked = 0  # tokens chosen under the whole vocabulary's mask
        self._chains: list[Any] = []  # every chain this sampler frees
        # A repetition penalty would also punish the quotes and commas that JSON repeats.
        penalty = repeat_penalty if grammar is None else 1.0
        self._chain = self._new_chain(self._penalty(vocab, penalty), *self._choice())
        self._grammar: Any = None
        if grammar is None:
            return
        self._grammar = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self._grammar:
            self.close()
            raise GrammarError("llama.cpp cannot parse the grammar made from this schema")
        # The grammar first, then the free chain's choice: llama.cpp's resampling.
        self._masked_chain = self._new_chain(self._grammar, *self._choice())
        # CANDIDATES: llama.cpp keeps the likeliest tokens and hands them to _capture, which
        # copies them here; the grammar and then the free chain's choice run on the copy.
        steps = [n for n in CANDIDATE_STEPS if n < lib.llama_vocab_n_tokens(vocab)]
        self._top = (lib.llama_token_data * max(steps, default=1))()
        self._top_logits = memoryview(self._top).cast("B").cast("f")[1::3]  # id, logit, p
        self._top_count = 0
        self._top_array = lib.llama_token_data_array(data=self._top, size=0, selected=-1)
        self._capture_iface = lib.llama_sampler_i()
        self._capture_apply = lib.llama_sampler_i_apply(self._capture)  # kept alive with self
        self._capture_iface.apply = self._capture_apply
        self._top_k_chains = [
            self._new_chain(
                lib.llama_sampler_init_top_k(n),
                lib.llama_sampler_init(ctypes.pointer(self._capture_iface), None),
            )
            for n in steps
        ]
        self._choice_chain = self._new_chain(*self._choice())
        self._index = index
        self._n_vocab = lib.llama_vocab_n_tokens(vocab)

    def _penalty(self, vocab: lib.llama_vocab_p, repeat_penalty: float) -> Any:
        if repeat_penalty == 1.0:
            return None
        return lib.llama_sampler_init_penalties(
            lib.llama_vocab_n_tokens(vocab), _PENALTY_LAST_N, repeat_penalty, 0, 0
        )

    def _choice(self) -> list[Any]:
        """The stages that pick a token from the candidates (a fresh set for each chain)."""
        if self._temperature == 0:
            return [lib.llama_sampler_init_greedy()]
        return [
            lib.llama_sampler_init_top_k(_TOP_K),
            lib.llama_sampler_init_top_p(_TOP_P, 1),
            lib.llama_sampler_init_min_p(_MIN_P, 1),
            lib.llama_sampler_init_temp(self._temperature),
            lib.llama_sampler_init_dist(self._seed),
        ]

    def _new_chain(self, *stages: Any) -> Any:
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._chains.append(chain)
        for stage in stages:
            if stage is not None:
                lib.llama_sampler_chain_add(chain, stage)  # the chain owns and frees it
        return chain

    def sample(self, ctx: lib.llama_context_p) -> int:
        """The next token from the last decoded position's logits."""
        if self._grammar is None:
            return int(lib.llama_sampler_sample(self._chain, ctx, -1))
        token = None
        if self._mode is GrammarMode.CANDIDATES:
            token = self._from_candidates(ctx)
        elif self._mode is GrammarMode.GROUPS:
            token = self._from_groups(ctx)
        elif self._mode is GrammarMode.SAMPLED:
            token = self._sampled_if_allowed(ctx)
        if token is not None:
            # Never accept a token the grammar refused: llama.cpp aborts the process on it.
            lib.llama_sampler_accept(self._grammar, token)
            self.checked += 1
            return token
        self.masked += 1
        # The chain applies the grammar to the whole vocabulary and accepts the token into it.
        return int(lib.llama_sampler_sample(self._masked_chain, ctx, -1))

    def _from_candidates(self, ctx: lib.llama_context_p) -> int | None:
        # The likeliest tokens first: a trained model's choice is nearly always among them.
        first, *rest = self._top_k_chains or [None]
        token = None if first is None else self._from_top(ctx, first)
        if token is None:
            token = self._from_groups(ctx)
        for top_k_chain in rest:
            if token is not None:
                break
            token = self._from_top(ctx, top_k_chain)
        return token

    def _from_top(self, ctx: lib.llama_context_p, top_k_chain: Any) -> int | None:
        """The choice among the likeliest tokens the grammar allows; None: it allows none."""
        candidates = self._top_array
        self._top_count = 0
        lib.llama_sampler_sample(top_k_chain, ctx, -1)  # fills self._top via _capture
        candidates.size, candidates.selected, candidates.sorted = self._top_count, -1, True
        lib.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        if self._top_count and max(self._top_logits[: self._top_count]) != -math.inf:
            candidates.sorted = False  # refused candidates now sit at -inf among the rest
            lib.llama_sampler_apply(self._choice_chain, ctypes.byref(candidates))
            return int(self._top[candidates.selected].id)
        return None

    def _from_groups(self, ctx: lib.llama_context_p) -> int | None:
        """The whole-vocabulary mask's choice, from the groups that may hold allowed tokens;
        None when they are too many (then the grammar allows much: the likelier steps run)."""
        if self._index is None or (tokens := self._index.candidates(self._grammar)) is None:
            return None
        pointer = lib.llama_get_logits_ith(ctx, -1)
        logits = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * self._n_vocab)).contents
        chosen = self._index.scratch
        chosen.fill(tokens, memoryview(logits).cast("B").cast("f"))
        candidates = chosen.array()
        lib.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        if not chosen.any_allowed():
            return None
        lib.llama_sampler_apply(self._choice_chain, ctypes.byref(candidates))
        return int(chosen.data[candidates.selected].id)

    def _capture(self, _sampler: Any, cur_p: Any) -> None:
        """The top-k stage's candidates, copied out (called by llama.cpp inside the chain)."""
        try:
            array = cur_p.contents
            count = min(int(array.size), len(self._top))
            ctypes.memmove(self._top, array.data, count * ctypes.sizeof(lib.llama_token_data))
            self._top_count = count
            array.selected = 0  # llama_sampler_sample reads one; the choice is made after
        except Exception:  # noqa: BLE001 - an exception must never cross back into C
            self._top_count = 0

    def _sampled_if_allowed(self, ctx: lib.llama_context_p) -> int | None:
        token = int(lib.llama_sampler_sample(self._chain, ctx, -1))
        one = lib.llama_token_data(id=token, logit=1.0, p=0.0)
        array = lib.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1)
        lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return None if one.logit == -math.inf else token

    def close(self) -> None:
        for chain in self._chains:
            lib.llama_sampler_free(chain)
        self._chains = []
