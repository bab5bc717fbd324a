"""llama.cpp's own log lines, routed into Python logging (journald) instead of raw stderr.

ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings while a model loads
are notes on the file ("control-looking token ... probably a bug in the model") or on the
context it gets; they repeat at every start and there is nothing an operator can do, so they
are DEBUG. A warning at any other time is unusual and stays visible at INFO.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

from daemon.llamacpp import lib

llama_log = logging.getLogger("llama.cpp")

_GGML_LEVELS = {3: logging.INFO, 4: logging.ERROR}
_GGML_LEVELS_LOADING = {3: logging.DEBUG, 4: logging.ERROR}
_llama_levels = _GGML_LEVELS


@lib.llama_log_callback  # type: ignore[untyped-decorator]
def route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """The callback llama.cpp calls with each of its log lines."""
    try:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            llama_log.log(_llama_levels.get(level, logging.DEBUG), "%s", message)
    except Exception:  # noqa: BLE001 - an exception must never cross back into C
        return


def install() -> None:
    """Send llama.cpp's log lines (of every model and context) to route_llama_log."""
    lib.llama_log_set(route_llama_log, ctypes.c_void_p(0))


@contextlib.contextmanager
def model_notes_at_debug() -> Iterator[None]:
    """While a model loads, llama.cpp's warnings are notes on the file: DEBUG, not INFO."""
    global _llama_levels  # noqa: PLW0603 - the C log callback has no object to hold it
    _llama_levels = _GGML_LEVELS_LOADING
    try:
        yield
    finally:
        _llama_levels = _GGML_LEVELS
