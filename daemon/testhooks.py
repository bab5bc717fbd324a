"""Switches that make answers predictable for the test suite and the benchmarks.

The daemon reads them from KIOSKD_TEST_* variables; with none set, nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestHooks:
    """Switches for the test suite and benchmarks, read from KIOSKD_TEST_* variables.

    ignore_eos: keep generating past end-of-turn (and the completion frame's stops), so
      answers have a known length.
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
