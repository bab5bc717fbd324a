"""A command on its own pseudo-terminal, as a person runs it: Ctrl-C goes through the tty driver."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence

from tests.support.daemon import REPO


class Terminal:
    """Runs argv with a pty as its controlling terminal and collects everything it prints."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        # setsid -c makes the pty the controlling terminal of a new session, so the tty driver
        # turns a typed ^C into SIGINT for the command, exactly as in an interactive shell.
        self.process = subprocess.Popen(
            ["setsid", "--wait", "--ctty", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env=env,
        )
        os.close(slave)
        self._master = master
        self._output = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: the command and every copy of the slave side are gone
                data = b""
            with self._cond:
                self._output += data
                self._cond.notify_all()
            if not data:
                return

    def output(self) -> str:
        with self._cond:
            return self._output.decode("utf-8", "replace")

    def wait_output(self, text: str, timeout_s: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: text.encode() in self._output, timeout_s):
                raise TimeoutError(f"{text!r} not shown within {timeout_s} s; got {self.output()}")

    def type(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def wait(self, timeout_s: float) -> int:
        rc = self.process.wait(timeout_s)
        self._reader.join(5)
        return rc

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        os.close(self._master)
