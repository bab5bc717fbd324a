"""llama.cpp's own log lines: notes on the model file are DEBUG, other warnings stay visible."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from daemon import llamalog
from daemon.engine import Engine
from tests.support.engines import small_settings

GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4


def llama_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llama.cpp"]


def test_model_file_notes_are_debug_and_later_warnings_info(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = small_settings(model_path)
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        engine = Engine(settings)
    try:
        loading = llama_records(caplog)
        # The embedded Gemma 3 file has this note; llama.cpp logs it as a warning.
        notes = [r for r in loading if "control-looking token" in r.getMessage()]
        assert notes, [r.getMessage() for r in loading][:20]
        assert {r.levelno for r in notes} == {logging.DEBUG}
        assert [r.getMessage() for r in loading if r.levelno >= logging.INFO] == []

        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
            # What llama.cpp calls when it warns or fails while answering.
            llamalog.route_llama_log(GGML_LOG_LEVEL_WARN, b"a warning at run time\n", None)
            llamalog.route_llama_log(GGML_LOG_LEVEL_ERROR, b"an error\n", None)
        assert [(r.levelno, r.getMessage()) for r in llama_records(caplog)] == [
            (logging.INFO, "a warning at run time"),
            (logging.ERROR, "an error"),
        ]
    finally:
        engine.close()
