"""JSON answers (docs/protocol.md, "Stop strings and JSON answers"): a request's `format` as a
grammar for the sampler, and the finished answer parsed and checked against its schema.

The grammar comes from llama.cpp's own JSON-schema-to-grammar converter, so the keywords kioskd
enforces are exactly the ones llama.cpp documents. Converting a schema costs milliseconds, and a
device tends to send the same schema with every question, so grammars are cached by the
schema's hash. `jsonschema` (8 MiB of resident memory) is imported only once a request brings
a format.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# "json": any JSON object, as Ollama's and llama.cpp's JSON modes give.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Grammars kept; one per schema a client uses, so a few dozen cover a whole plant.
_CACHE_SIZE = 32
# The converter's string characters let raw control characters (a line break) into a string,
# which JSON forbids; llama.cpp's newer converter excludes them the same way.
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)
_STRICT_CHAR = (
    r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F] [0-9a-fA-F])"
)
# Counts that make llama.cpp copy a rule that many times; its own limit is 2000 copies, but a
# few hundred copies of a nested rule already take seconds to build.
_MAX_COUNT = 256
_COUNT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength")
_MAX_MESSAGE_CHARS = 200
_CONVERTER_ERRORS = (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError)


@dataclass(frozen=True)
class JsonValue:
    """A JSON answer, parsed (wrapped, since null is a value too)."""

    value: Any


class FormatError(ValueError):
    """A `format` the daemon cannot enforce; the message is for a person."""


@dataclass(frozen=True)
class AnswerFormat:
    """A request's format: the grammar that constrains the answer and the schema it must meet."""

    schema: dict[str, Any] = field(compare=False)
    grammar: str = field(compare=False)
    digest: str  # sha256 of the schema as compact JSON: the cache key

    def check(self, text: str) -> tuple[JsonValue | None, str | None]:
        """The parsed answer and None, or (None, why it is not what the format asks for)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            return None, _shortened(f"the answer is not complete JSON: {exc}")
        from jsonschema import exceptions  # noqa: PLC0415 - see the module docstring

        try:
            _validator(self.schema).validate(value)
        except exceptions.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path) or "the answer"
            return None, _shortened(f"{where}: {exc.message}")
        return JsonValue(value), None


def _shortened(message: str) -> str:
    """A message for a person, short enough for a tiny device's done (the value it quotes can
    be the whole answer)."""
    return (
        message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 3] + "..."
    )


def answer_format(value: Any, *, max_schema_bytes: int) -> AnswerFormat:
    """The AnswerFormat for a request's `format` field; FormatError says what is wrong."""
    if value == "json":
        schema = _ANY_OBJECT
    elif isinstance(value, dict):
        if value.get("type") != "json_schema":
            raise FormatError('must be "json" or {"type": "json_schema", "schema": {...}}')
        if not isinstance(value.get("schema"), dict):
            raise FormatError("schema: must be a JSON object (a JSON schema)")
        schema = value["schema"]
    else:
        raise FormatError('must be "json" or {"type": "json_schema", "schema": {...}}')
    # Key order is kept: the grammar writes properties in the schema's order.
    canonical = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    try:
        encoded = canonical.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON escape like "\ud800"
        raise FormatError("schema: contains an unpaired UTF-16 surrogate") from exc
    size = len(encoded)
    if size > max_schema_bytes:
        raise FormatError(
            f"schema: {size} bytes as compact JSON; at most {max_schema_bytes} are accepted"
        )
    digest = hashlib.sha256(encoded).hexdigest()
    with _lock:
        cached = _cache.get(digest)
        if cached is not None:
            _cache.move_to_end(digest)
            return cached
    built = AnswerFormat(schema, _grammar(schema, canonical), digest)
    with _lock:
        _cache[digest] = built
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return built


def _grammar(schema: dict[str, Any], canonical: str) -> str:
    _check_counts(schema)
    from jsonschema import exceptions  # noqa: PLC0415 - see the module docstring

    try:
        _validator(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise FormatError(
            f"schema: not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}"
        ) from exc
    from daemon.llamacpp import schema_to_grammar  # noqa: PLC0415 - the daemon has loaded it

    try:
        grammar = schema_to_grammar(canonical)
    except RecursionError as exc:
        raise FormatError("schema: nested too deeply to enforce") from exc
    except _CONVERTER_ERRORS as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FormatError(f"schema: cannot be enforced as a grammar ({reason})") from exc
    return _CHAR_RULE.sub(lambda _match: _STRICT_CHAR, grammar)


def _check_counts(schema: Any) -> None:
    """Refuse repetition counts that would make the grammar huge (walked without recursion)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for keyword in _COUNT_KEYWORDS:
                count = node.get(keyword)
                if (
                    isinstance(count, int | float)
                    and not isinstance(count, bool)
                    and (count > _MAX_COUNT)
                ):
                    raise FormatError(
                        f"schema: {keyword} {count} is more than the {_MAX_COUNT} kioskd enforces"
                    )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _validator(schema: dict[str, Any]) -> Any:
    from jsonschema import Draft202012Validator, validators  # noqa: PLC0415

    # A schema naming no draft ($schema) is read as the newest, as most tools do.
    return validators.validator_for(schema, default=Draft202012Validator)(schema)


_lock = threading.Lock()
_cache: OrderedDict[str, AnswerFormat] = OrderedDict()


def json_complete(text: str) -> bool:
    """Whether `text` is a whole JSON object, array or string that nothing could extend: once
    it is, the grammar allows only white space, so the answer is over."""
    stripped = text.strip()
    if not stripped or stripped[-1] not in '}]"':
        return False
    try:
        json.loads(stripped)
    except ValueError:
        return False
    return True
