"""`kioskd web` as a subprocess on a free loopback port, for the kiosk screen's tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, free_port, wait_listening


class WebService:
    """One `kioskd web --config FILE`; stop() and start() again keep its port."""

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._command = [
            *(sys.executable, "-m", "daemon", "web", "--config", str(config_path)),
            *("--listen", f"127.0.0.1:{self.port}"),
        ]
        self.log_path = log_dir / f"web-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        wait_listening(self.port)

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        return self._process.wait(10)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


WebFactory = Callable[[Path], WebService]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebFactory]:
    """Start `kioskd web` with a config file; each must then stop on SIGTERM with exit code 0."""
    started: list[WebService] = []

    def start(config_path: Path) -> WebService:
        service = WebService(config_path, tmp_path)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        if service.running:
            assert service.stop() == 0, service.log_path.read_text()
