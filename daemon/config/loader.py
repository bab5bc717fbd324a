"""Loading: YAML with each key's line, then type and value checks that collect every problem.

Loading is layered (`load` reads and locates keys, `from_dict` checks and builds) so that tests
build configs from dicts. Errors name the key path and, from a file, its line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from daemon.config.errors import ConfigError
from daemon.config.keys import _Check
from daemon.config.rules import cross_checks
from daemon.config.schema import Config

_Section = TypeVar("_Section")


def load(path: str | Path) -> Config:
    """Read, locate and check a YAML config file; raise ConfigError naming key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    return from_dict(raw if raw is not None else {}, lines=lines, source=str(path))


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key_path = f"{prefix}{key_node.value}"
        lines[key_path] = key_node.start_mark.line + 1
        _record_lines(value_node, key_path + ".", lines)


def from_dict(
    raw: Mapping[str, Any], *, lines: Mapping[str, int] | None = None, source: str = "<config>"
) -> Config:
    """Build a Config from nested dicts, collecting every problem before raising ConfigError."""
    lines = lines or {}
    problems: list[str] = []

    def where(key_path: str) -> str:
        line = lines.get(key_path)
        return f"{source}:{line}" if line else source

    if not isinstance(raw, Mapping):
        raise ConfigError([f"{source}: the top level must be a mapping of sections"])
    sections: dict[str, Any] = {}
    section_types = get_type_hints(Config)
    for name, value in raw.items():
        if name not in section_types:
            problems.append(
                f"{where(str(name))}: {name}: unknown section{_hint(name, section_types)}"
            )
            continue
        keys = {} if value is None else value
        if not isinstance(keys, Mapping):
            problems.append(f"{where(name)}: {name}: must be a mapping of keys")
            continue
        sections[name] = _build_section(section_types[name], name, keys, where, problems)
    if problems:
        raise ConfigError(problems)
    config = Config(**sections)
    problems = [f"{where(path)}: {path}: {problem}" for path, problem in cross_checks(config)]
    if problems:
        raise ConfigError(problems)
    return config


def _build_section(
    cls: type[_Section],
    section: str,
    values: Mapping[str, Any],
    where: Callable[[str], str],
    problems: list[str],
) -> _Section:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    types = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key_path = f"{section}.{key}"
        if key not in fields:
            known = {f"{section}.{k}": None for k in fields}
            problems.append(f"{where(key_path)}: {key_path}: unknown key{_hint(key_path, known)}")
            continue
        if dataclasses.is_dataclass(types[key]):  # a nested section such as mqtt.tls
            if value is not None and not isinstance(value, Mapping):
                problems.append(f"{where(key_path)}: {key_path}: must be a mapping of keys")
                continue
            kwargs[key] = _build_section(types[key], key_path, value or {}, where, problems)
            continue
        problem = _check_value(types[key], value, fields[key].metadata.get("check"))
        if problem:
            problems.append(f"{where(key_path)}: {key_path}: {problem} (got {value!r})")
            continue
        expected = types[key]
        kwargs[key] = (
            float(value) if expected in (float, float | None) and value is not None else value
        )
    return cls(**kwargs)


def _check_value(expected: Any, value: Any, check: _Check | None) -> str | None:
    optional = expected in (str | None, int | None, float | None, list[str] | None)
    if value is None:
        return None if optional else "must not be empty"
    base = {str | None: str, int | None: int, float | None: float, list[str] | None: list}.get(
        expected, expected
    )
    if base == list[str]:  # a generic alias is equal to, not the same object as, another
        base = list
    if base is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return "must be a number"
    elif base is bool:
        if not isinstance(value, bool):
            return "must be true or false"
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
    elif base is str:
        if not isinstance(value, str):
            return "must be a string (quote it)"
    elif base is list and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        return "must be a list of strings"
    return check(value) if check else None


def _hint(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
