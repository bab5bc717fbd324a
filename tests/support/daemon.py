"""The repository root, the broker and the `kioskd run` subprocess that e2e tests and their
support code share; the fixtures that start them live in tests/e2e/conftest.py."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.bench.localbroker import MOSQUITTO, LocalBroker, free_port, wait_listening

REPO = Path(__file__).resolve().parents[2]
__all__ = ["MOSQUITTO", "REPO", "Broker", "Daemon", "DaemonFactory", "free_port", "wait_listening"]


# The test suite starts mosquitto the same way as the benchmarks.
Broker = LocalBroker


@dataclass
class Daemon:
    """A `kioskd run` subprocess with its config and log."""

    process: subprocess.Popen[bytes]
    prefix: str
    log_path: Path
    config_path: Path
    stopped_rc: int | None = field(default=None)

    def topic(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.stopped_rc = self.process.wait(timeout_s)
        return self.stopped_rc


DaemonFactory = Callable[..., Daemon]
