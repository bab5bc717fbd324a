"""`kioskd ask --stop/--json-schema/--json-object`: how an answer is asked to end and what
shape it must have (docs/protocol.md, "Stop strings and JSON answers")."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AnswerOptions:
    """The request fields the options ask for (None: not asked)."""

    stop: list[str] | None
    answer_format: str | dict[str, Any] | None


def add_options(ask: argparse.ArgumentParser) -> None:
    ask.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the answer before TEXT (up to 4 times; \\n is a line break)",
    )
    shape = ask.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="answer as JSON that meets the JSON schema in FILE (exit 1 without it)",
    )
    shape.add_argument(
        "--json-object", action="store_true", help="answer as any JSON object (exit 1 without it)"
    )


def options(args: argparse.Namespace) -> AnswerOptions | None:
    """The request fields from the parsed options; None when they are wrong (said on stderr)."""
    try:
        return _options(args)
    except ValueError as exc:
        print(f"kioskd ask: {exc}", file=sys.stderr, flush=True)
        return None


def _options(args: argparse.Namespace) -> AnswerOptions:
    # A shell cannot easily pass a line break in an argument: "\n" stands for one.
    stop = [text.replace("\\n", "\n") for text in args.stop or []] or None
    if args.json_object:
        return AnswerOptions(stop, "json")
    if args.json_schema is None:
        return AnswerOptions(stop, None)
    try:
        schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--json-schema: cannot read {args.json_schema}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ValueError(f"--json-schema: {args.json_schema} is not JSON: {exc}") from exc
    return AnswerOptions(stop, {"type": "json_schema", "schema": schema})


def missing_json(args: argparse.Namespace, done: dict[str, Any]) -> str | None:
    """Why a `done` lacks the JSON that --json-schema or --json-object asked for, or None."""
    if not (args.json_schema or args.json_object):
        return None
    if "json" in done or done.get("json_omitted"):
        return None
    return str(done.get("json_error") or f"finish_reason {done.get('finish_reason')}")
