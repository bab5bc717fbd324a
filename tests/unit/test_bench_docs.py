"""Every `kioskd bench` command that docs/benchmarks.md and the README quote still parses: the
figures point at commands a reader can run (issue 15)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from daemon.cli import parser

REPO = Path(__file__).resolve().parents[2]
# `kioskd bench ...` or `scripts/bench ...`, up to a closing backtick, a comment or the line end.
_COMMAND = re.compile(r"(?:kioskd|scripts/) ?bench ([^`#\n|]*)")


def _quoted_commands() -> list[str]:
    commands = []
    for doc in ("docs/benchmarks.md", "README.md"):
        for line in (REPO / doc).read_text().splitlines():
            for match in _COMMAND.finditer(line):
                words = match.group(1).strip().rstrip(".,;:)")
                if words and not words.startswith(("-h", "extra", "figures")):
                    commands.append(words)
    return sorted(set(commands))


def test_the_docs_quote_bench_commands() -> None:
    assert len(_quoted_commands()) >= 12


@pytest.mark.parametrize("command", _quoted_commands())
def test_a_quoted_bench_command_parses(command: str) -> None:
    args = parser().parse_args(["bench", *shlex.split(command)])
    assert callable(args.handler)
