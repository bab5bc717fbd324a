"""A conversation's model state (the KV cache of its tokens), copied out of llama.cpp and back.

llama_state_seq_get_data copies one sequence's keys and values, and nothing else: no logits
(Llama.save_state copies those too, 0.6 MiB per token of a 151,936-token vocabulary) and no
sampler. The copy lives in an anonymous memory map of its own, so that dropping it gives the
pages back to the kernel at once: a heap allocation of a few MiB would stay in the process's
heap after it is freed, and the memory bound on conversations would hold only on paper.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Any

from daemon.llamacpp import lib

# The one sequence kioskd decodes in; a saved state is restored into it.
_SEQUENCE = 0


@dataclass(frozen=True, eq=False)
class SavedState:
    """The model state of `tokens` (in order from position 0), as llama.cpp serialises it."""

    tokens: tuple[int, ...]
    data: mmap.mmap

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def common_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this state holds."""
        return common_prefix(self.tokens, prompt)


def common_prefix(held: tuple[int, ...] | list[int], prompt: list[int]) -> int:
    same = 0
    for old, new in zip(held, prompt, strict=False):
        if old != new:
            break
        same += 1
    return same


def blank(size: int) -> mmap.mmap:
    """Zeroed private memory of `size` bytes for a state (also for one read from a file)."""
    return mmap.mmap(-1, max(size, 1))


def capture(context: lib.llama_context_p, tokens: list[int]) -> SavedState | None:
    """A copy of the sequence's state; None when llama.cpp reports nothing to copy."""
    size = lib.llama_state_seq_get_size(context, _SEQUENCE)
    if size <= 0 or not tokens:
        return None
    data = blank(size)
    written = lib.llama_state_seq_get_data(context, _address(data), size, _SEQUENCE)
    if written != size:
        return None
    return SavedState(tuple(tokens), data)


def restore(context: lib.llama_context_p, state: SavedState) -> bool:
    """Load `state` into the sequence, replacing what it held; False when llama.cpp refuses it
    (a state from another model or context size), and then the sequence is empty."""
    read = lib.llama_state_seq_set_data(context, _address(state.data), state.nbytes, _SEQUENCE)
    return bool(read)


def _address(data: mmap.mmap) -> Any:
    # The map's bytes as a ctypes array, without a copy; ctypes passes an array where a pointer
    # to its items is expected. Not ctypes.cast: its result and the array share a dict that
    # holds the array, a reference cycle that kept every state's map until the cyclic
    # collector ran (measured: 30 dropped states of 1 MiB, +29 MiB RSS).
    return (ctypes.c_uint8 * len(data)).from_buffer(data)
