"""How a config key is declared: `_key(default, doc, check)` and the value checks it shares.

A declaration is a dataclass field whose metadata holds the one-line doc (read by `describe`,
which tests hold the README's key table to) and the check the loader runs on a value from a
file. The checks here serve keys in several sections; a check that serves one key sits beside
that key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

_Check = Callable[[Any], str | None]


def _key(default: Any, doc: str, check: _Check | None = None) -> Any:
    """Declare a config key with its default, its one-line doc and an optional value check."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, "check": check})
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(minimum: float) -> _Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _between(low: float, high: float) -> _Check:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(*choices: str) -> _Check:
    return lambda value: None if value in choices else "must be one of " + ", ".join(choices)


def _topic_prefix(value: str) -> str | None:
    if not value or value.startswith(("/", "$")) or value.endswith("/"):
        return "must be non-empty, not start with '/' or '$', and not end with '/'"
    if any(c in value for c in "+#\0"):
        return "must not contain MQTT wildcards (+, #) or NUL"
    return None
