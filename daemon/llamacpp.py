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


def _load_bindings() -> types.ModuleType:
    loaded = sys.modules.get(_BINDINGS)
    if loaded is not None:
        return loaded
    if "llama_cpp" in sys.modules:  # the whole package is already loaded: nothing to save
        return importlib.import_module(_BINDINGS)
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
        return importlib.import_module(_BINDINGS)
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]


if TYPE_CHECKING:
    from llama_cpp import llama_cpp as lib
else:
    lib = _load_bindings()

__all__ = ["lib"]
