"""`kioskd web` as a subprocess on a free loopback port, for the kiosk screen's tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_listening

WebFactory = Callable[[Path], str]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebFactory]:
    """Start `kioskd web --config FILE` on a free port; returns the page's URL.

    At the end each one must stop on SIGTERM with exit code 0.
    """
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(config_path: Path) -> str:
        port = free_port()
        command = [sys.executable, "-m", "daemon", "web", "--config", str(config_path)]
        log_path = tmp_path / f"web-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, "--listen", f"127.0.0.1:{port}"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append((process, log_path))
        wait_listening(port)
        return f"http://127.0.0.1:{port}/"

    yield start
    for process, log_path in started:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()
