"""A private mosquitto on a free loopback port, for the benchmarks and the test suite."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing is listening on 127.0.0.1:{port}")


@dataclass
class LocalBroker:
    """mosquitto with a temporary config; may be stopped and started again on the same port."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""

    def config_text(self) -> str:
        return (
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # Without it mosquitto's own sends can wait ~40 ms for a delayed ACK.
            "set_tcp_nodelay true\n"
            # stderr, not a file: started as root, mosquitto drops to its own user.
            "log_dest stderr\n" + self.extra_config
        )

    def start(self) -> None:
        self.process = launch(self.workdir, self.config_text(), self.port)

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def launch(workdir: Path, config_text: str, *ports: int) -> subprocess.Popen[bytes]:
    """Start mosquitto with this config, logging to workdir, and wait for its listeners."""
    conf = workdir / "mosquitto.conf"
    conf.write_text(config_text)
    with (workdir / "mosquitto.log").open("ab") as log:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for port in ports:
            wait_listening(port)
    except TimeoutError:
        terminate(process)
        raise
    return process


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        process.wait(10)
