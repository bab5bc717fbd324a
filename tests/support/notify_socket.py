"""A unix datagram socket standing in for systemd's NOTIFY_SOCKET (systemd is not PID 1 here)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class NotifySocket:
    """Receives sd_notify datagrams with their arrival times."""

    path: Path
    sock: socket.socket
    messages: list[tuple[float, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def open(cls, path: Path) -> NotifySocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        receiver = cls(path, sock)
        threading.Thread(target=receiver._receive_forever, daemon=True).start()
        return receiver

    def _receive_forever(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode()))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60) -> float:
        """Arrival time of the first datagram containing `text`."""
        with self.cond:
            ok = self.cond.wait_for(lambda: any(text in m for _t, m in self.messages), timeout_s)
            if not ok:
                raise TimeoutError(f"no {text!r} in {self.messages}")
            return next(t for t, m in self.messages if text in m)

    def statuses(self) -> list[str]:
        """Every STATUS= value received, in order."""
        with self.cond:
            return [
                line.removeprefix("STATUS=")
                for _t, message in self.messages
                for line in message.splitlines()
                if line.startswith("STATUS=")
            ]

    def pings_between(self, start: float, end: float) -> list[float]:
        with self.cond:
            return [t for t, m in self.messages if "WATCHDOG=1" in m and start <= t <= end]

    def close(self) -> None:
        self.sock.close()
