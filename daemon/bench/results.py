"""What a benchmark's typed result records about its run, and how it is written as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

# Field metadata for jsonable.
FLATTEN: dict[str, Any] = {"flatten": True}
OMIT_IF_NONE: dict[str, Any] = {"omit_if_none": True}


def command_line() -> str:
    return "kioskd bench " + " ".join(sys.argv[2:])


@dataclass(frozen=True)
class Machine:
    cpu_count: int | None
    llama_cpp_python: str


@dataclass(frozen=True)
class Run:
    """How a result was measured: what every result file opens with."""

    command: str
    model: str
    threads: int
    reps: int
    machine: Machine


def this_run(model: Path, threads: int, reps: int) -> Run:
    return Run(command_line(), str(model), threads, reps, machine())


def machine() -> Machine:
    return Machine(os.cpu_count(), llama_cpp.__version__)


def jsonable(value: Any) -> Any:
    """A result as JSON values: dataclasses become objects with their field names as keys.

    A field with metadata flatten=True puts its own fields into its parent's object (none when
    it is None); one with omit_if_none=True is left out when it is None. A dataclass with a
    to_json method writes itself.
    """
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for item in dataclasses.fields(value):
            inner = jsonable(getattr(value, item.name))
            if item.metadata.get("flatten"):
                out.update(inner or {})
            elif inner is not None or not item.metadata.get("omit_if_none"):
                out[item.name] = inner
        return out
    if isinstance(value, Mapping):
        return {str(key): jsonable(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(inner) for inner in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(result: object, out_dir: Path, name: str) -> Path:
    """The (dataclass) result as out_dir/NAME, in JSON; returns that path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(jsonable(result), indent=2))
    return path
