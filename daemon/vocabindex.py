"""The vocabulary by its tokens' leading bytes, so that a grammar is checked against the tokens
it may allow instead of all of them.

llama.cpp's grammar allows a token when it can read all of the token's bytes from where it
stands (a character split across tokens is matched in part). So it allows a token only if it
also allows the token made of that token's first byte, and the one made of its first two bytes:
checking a few hundred such short tokens tells which groups of the vocabulary can hold an
allowed token at all. Groups are by first byte, and a crowded first byte (a space leads a third
of Qwen's vocabulary) by its first two. Every token of the groups found is then checked for
real, so the allowed set is exactly the whole-vocabulary mask's. End-of-generation tokens, and
tokens whose leading bytes have no short token to stand for them, are always checked.
"""

from __future__ import annotations

import ctypes
import math
from array import array
from collections import defaultdict
from collections.abc import Sequence
from operator import itemgetter

from daemon.llamacpp import lib

# A first-byte group larger than this is split by the second byte.
_SPLIT_TOKENS = 512
# The most tokens `candidates` returns; between two values of a JSON answer they were 26-6020
# on Gemma. More, and the grammar allows much: checking the likeliest tokens is cheaper.
LIMIT = 16384
_PIECE_BYTES = 256
_NONE = -1


class VocabIndex:
    """One model's vocabulary, grouped once by leading bytes (0.2-0.4 s for 150-260k tokens)."""

    def __init__(self, vocab: lib.llama_vocab_p) -> None:
        count = lib.llama_vocab_n_tokens(vocab)
        # Each token's first two bytes as one number (_NONE: none); Python objects for 260k
        # tokens would cost a kiosk 16 MiB of resident memory, these arrays under 1 MiB.
        heads = array("i", [_NONE]) * count
        short: dict[int, int] = {}  # the token whose whole text is these one or two bytes
        per_first = array("i", [0]) * 256
        always = array("i")  # the tokens checked every time
        buffer = ctypes.create_string_buffer(_PIECE_BYTES)
        for token in range(count):
            if lib.llama_vocab_is_eog(vocab, token):
                always.append(token)  # allowed where the grammar may end, whatever its text
                continue
            # Special tokens with their text, as the grammar reads them.
            length = lib.llama_token_to_piece(vocab, token, buffer, _PIECE_BYTES, 0, True)
            if length < 0:
                always.append(token)  # longer than the buffer
                continue
            if length == 0:
                continue  # the grammar never allows a token without text
            head = _key(buffer.raw[0], buffer.raw[1] if length > 1 else None)
            heads[token] = head
            per_first[buffer.raw[0]] += 1
            if length <= 2:
                short.setdefault(head, token)
        groups: defaultdict[int, array[int]] = defaultdict(lambda: array("i"))
        for token, head in enumerate(heads):
            if head == _NONE:
                continue
            first = head // 257
            # A crowded first byte is split by the second where a two-byte token stands for it.
            group = head if per_first[first] > _SPLIT_TOKENS and head in short else first * 257
            groups[group].append(token)
        self.probes = array("i")  # the short tokens checked first
        self.groups: list[array[int]] = []  # the tokens to check when probes[i] is allowed
        # Groups still crowded (a space, then a character no two-byte token starts: 42,000 of
        # Gemma's tokens) are split by their second byte, checked after the first is read.
        self._deep: dict[int, dict[int, array[int]]] = {}
        for prefix, members in groups.items():
            if prefix not in short:
                always.extend(members)
                continue
            probe = len(self.probes)
            self.probes.append(short[prefix])
            if len(members) > _SPLIT_TOKENS and prefix % 257 == 0:  # a first byte alone
                rest, self._deep[probe] = _by_second(members, heads, short)
                self.groups.append(rest)
            else:
                self.groups.append(members)
        self.always = always
        self._probe_data = Candidates(len(self.probes))
        # Where Sampler puts the candidates with their logits: allocated once per model.
        self.scratch = Candidates(LIMIT)
        self._bytes = array("i", (byte for byte in range(256) if byte * 257 in short))
        self._byte_tokens = array("i", (short[byte * 257] for byte in self._bytes))
        self._byte_data = Candidates(len(self._byte_tokens))

    def candidates(self, grammar: ctypes.c_void_p, limit: int = LIMIT) -> array[int] | None:
        """Every token the grammar may allow now, at most `limit` of them; None: more."""
        self._probe_data.fill(self.probes, None)
        found = array("i", self.always)
        for index in self._probe_data.apply(grammar):
            found.extend(self.groups[index])
            if index in self._deep:
                found.extend(self._after(grammar, self.probes[index], self._deep[index]))
            if len(found) > limit:
                return None
        return found

    def _after(
        self, grammar: ctypes.c_void_p, first: int, by_second: dict[int, array[int]]
    ) -> array[int]:
        """The tokens of `by_second` whose second byte the grammar allows after `first`."""
        found = array("i")
        reader = lib.llama_sampler_clone(grammar)
        try:
            lib.llama_sampler_accept(reader, first)  # allowed: its probe was
            self._byte_data.fill(self._byte_tokens, None)
            for index in self._byte_data.apply(reader):
                found.extend(by_second.get(self._bytes[index], ()))
        finally:
            lib.llama_sampler_free(reader)
        return found


def _by_second(
    members: array[int], heads: array[int], short: dict[int, int]
) -> tuple[array[int], dict[int, array[int]]]:
    """`members` split by their second byte, where a one-byte token stands for it; the rest
    (the one-byte token itself among them) are checked whenever the first byte is allowed."""
    rest = array("i")
    by_second: defaultdict[int, array[int]] = defaultdict(lambda: array("i"))
    for token in members:
        second = heads[token] % 257 - 1
        if second >= 0 and second * 257 in short:
            by_second[second].append(token)
        else:
            rest.append(token)
    return rest, dict(by_second)


class Candidates:
    """A llama.cpp token data array over chosen tokens, with the model's logits or none."""

    def __init__(self, capacity: int) -> None:
        self.data = (lib.llama_token_data * max(capacity, 1))()
        self.size = 0
        self._ids = memoryview(self.data).cast("B").cast("i")  # id, logit, p: 4 bytes each
        self._floats = memoryview(self.data).cast("B").cast("f")

    def fill(self, tokens: array[int], logits: Sequence[float] | None) -> None:
        """Put `tokens` in, with their logits (None: all 0, for a check alone)."""
        count = len(tokens)
        self._ids[0 : 3 * count : 3] = tokens
        if logits is None:
            self._floats[1 : 3 * count : 3] = array("f", bytes(4 * count))
        else:
            picked = itemgetter(*tokens)(logits) if count > 1 else (logits[tokens[0]],)
            self._floats[1 : 3 * count : 3] = array("f", picked)
        self.size = count

    def array(self) -> lib.llama_token_data_array:
        return lib.llama_token_data_array(data=self.data, size=self.size, selected=-1, sorted=False)

    def apply(self, sampler: ctypes.c_void_p) -> list[int]:
        """Apply `sampler` (the grammar) and return the indexes of the tokens it left allowed."""
        candidates = self.array()
        lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        logits = self._floats[1 : 3 * self.size : 3]
        return [index for index, logit in enumerate(logits) if logit != -math.inf]

    def any_allowed(self) -> bool:
        """Whether a grammar applied to this array left any token allowed."""
        return self.size > 0 and max(self._floats[1 : 3 * self.size : 3]) != -math.inf


def _key(first: int, second: int | None) -> int:
    """One number for a token's first byte, or its first two bytes."""
    return first * 257 + (0 if second is None else second + 1)
