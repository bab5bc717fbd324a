"""llama.cpp's C API, through llama-cpp-python's ctypes bindings and nothing else of it.

`import llama_cpp` runs the package's __init__, which also loads its high-level Llama class and
with it numpy, jinja2 and diskcache: 15.6 MiB of a kiosk's resident memory that kioskd does not
use (measured with the embedded model, docs/benchmarks.md). The bindings module,
`llama_cpp.llama_cpp`, needs none of them and is generated for exactly the library it ships
with, so kioskd loads that module alone instead of writing bindings of its own that could
drift from the library's structs.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

_BINDINGS = "llama_cpp.llama_cpp"
# llama.cpp's JSON-schema-to-grammar converter, in Python; it imports only the standard library.
_GRAMMAR = "llama_cpp.llama_grammar"


def _load_submodule(name: str) -> types.ModuleType:
    """A module of the llama_cpp package, loaded without running the package's __init__."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    if "llama_cpp" in sys.modules:  # the whole package is already loaded: nothing to save
        return importlib.import_module(name)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("llama-cpp-python is not installed")
    # A stand-in parent lets Python find the submodule without running the package's __init__.
    # It is removed again, so a later `import llama_cpp` (the benchmark's raw loop) loads the
    # real package, which then reuses this same bindings module from sys.modules.
    stand_in = types.ModuleType("llama_cpp")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama_cpp"] = stand_in
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]


def schema_to_grammar(schema_json: str) -> str:
    """llama.cpp's GBNF grammar for a JSON schema (given as JSON text); raises what the converter
    raises for a schema it cannot express (AssertionError, ValueError, KeyError, ...)."""
    converter = _load_submodule(_GRAMMAR)
    grammar: str = converter.json_schema_to_gbnf(schema_json)
    return grammar


if TYPE_CHECKING:
    from llama_cpp import llama_cpp as lib
else:
    lib = _load_submodule(_BINDINGS)

__all__ = ["lib", "schema_to_grammar"]
