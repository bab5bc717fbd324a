"""daemon.service against a real sd_notify socket, the way systemd would listen for it."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.service import (
    JournalFieldsFilter,
    Notifier,
    Watchdog,
    WorkerProgress,
    setup_logging,
)

WATCHDOG_NAME = "kioskd-watchdog"


@dataclass
class NotifySocket:
    """The listening end of NOTIFY_SOCKET."""

    sock: socket.socket
    address: str

    def receive(self, timeout_s: float = 2.0) -> str:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def assert_silent(self, wait_s: float = 0.1) -> None:
        self.sock.settimeout(wait_s)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)

    def watchdog_pings(self, duration_s: float) -> list[float]:
        """Monotonic arrival times of WATCHDOG=1 datagrams during the next `duration_s`."""
        arrivals: list[float] = []
        end = time.monotonic() + duration_s
        while (left_s := end - time.monotonic()) > 0:
            self.sock.settimeout(left_s)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            if message == "WATCHDOG=1":
                arrivals.append(time.monotonic())
        return arrivals


@pytest.fixture(params=["libsystemd", "socket"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with systemd-python, and as on a machine where it is not installed."""
    if request.param == "libsystemd":
        pytest.importorskip("systemd.daemon", reason="systemd-python is not installed")
    else:
        # A None entry makes `import systemd.daemon` raise ImportError, as without the package.
        monkeypatch.setitem(sys.modules, "systemd.daemon", None)
    return str(request.param)


@pytest.fixture
def socket_kind() -> str:
    """Where notify_socket binds; tests parametrize it to cover abstract names too."""
    return "path"


@pytest.fixture
def notify_socket(socket_kind: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A bound datagram socket advertised in NOTIFY_SOCKET: a path, or an abstract name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory(prefix="kioskd-", dir="/tmp") as directory:
        # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
        if socket_kind == "path":
            address = str(Path(directory) / "notify")
            sock.bind(address)
        else:
            address = f"@kioskd-test-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield NotifySocket(sock, address)
        finally:
            sock.close()


class FakeWorker:
    """Stands in for the scheduler's progress report."""

    def __init__(self) -> None:
        self.busy = False
        self.ticking = True
        self._frozen_at = time.monotonic()
        self.calls = 0

    def freeze(self) -> float:
        """Makes a busy worker stop producing tokens; returns when it last made progress."""
        self._frozen_at = time.monotonic()
        self.ticking = False
        return self._frozen_at

    def progress(self) -> WorkerProgress:
        self.calls += 1
        last = time.monotonic() if self.ticking else self._frozen_at
        return WorkerProgress(busy=self.busy, last_progress_monotonic=last)


@pytest.fixture
def no_watchdog_threads() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name == WATCHDOG_NAME]


@pytest.mark.parametrize("socket_kind", ["path", "abstract"])
def test_ready_status_stopping_datagrams(notify_socket: NotifySocket, backend: str) -> None:
    notifier = Notifier()
    assert notifier.enabled

    notifier.ready("ready: gemma3-270m, 3 threads")
    assert notify_socket.receive() == "READY=1\nSTATUS=ready: gemma3-270m, 3 threads"

    notifier.status("draining\n2 queued")
    assert notify_socket.receive() == "STATUS=draining 2 queued"

    notifier.watchdog_ping()
    assert notify_socket.receive() == "WATCHDOG=1"

    notifier.stopping()
    assert notify_socket.receive() == "STOPPING=1"


@pytest.mark.parametrize("socket_kind", ["path", "abstract"])
def test_without_notify_socket_everything_is_a_no_op(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The socket stays bound but is no longer advertised: nothing may reach it.
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = Notifier()

    assert not notifier.enabled
    notifier.ready("ready")
    notifier.status("busy")
    notifier.watchdog_ping()
    notifier.stopping()

    notify_socket.assert_silent()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_undeliverable_notification_warns_once_and_never_raises(
    backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"/tmp/kioskd-absent-{uuid.uuid4().hex}")
    notifier = Notifier()

    with caplog.at_level(logging.DEBUG, logger="daemon.service"):
        notifier.ready("ready")
        for _ in range(5):
            notifier.watchdog_ping()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("usec", "pid", "expected_s"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("200000", None, 0.1),
        (None, None, None),
        ("0", None, None),
        ("thirty", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected_s: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            own_pid = os.getpid()
            resolved = {"self": str(own_pid), "other": str(own_pid + 1)}.get(value, value)
            monkeypatch.setenv(name, resolved)

    assert Notifier().watchdog_interval_s() == expected_s


@pytest.mark.usefixtures("no_watchdog_threads")
def test_watchdog_pings_at_the_interval_from_watchdog_usec(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    worker = FakeWorker()  # idle: pings regardless of how long ago it last worked
    worker.ticking = False
    watchdog = Watchdog(Notifier(), stall_s=0.01, progress=worker.progress)
    assert watchdog.interval_s == pytest.approx(0.1)

    watchdog.start()
    try:
        pings = notify_socket.watchdog_pings(0.55)
    finally:
        watchdog.stop()

    # One at start, then every 0.1 s: six in 0.55 s. Never more; fewer on a loaded machine.
    assert 3 <= len(pings) <= 7


@pytest.mark.usefixtures("no_watchdog_threads")
def test_pings_stop_when_generation_stalls_and_resume_when_it_moves(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    interval_s, stall_s = 0.05, 0.2
    worker = FakeWorker()
    worker.busy = True
    watchdog = Watchdog(
        Notifier(), stall_s=stall_s, progress=worker.progress, interval_s=interval_s
    )

    with caplog.at_level(logging.WARNING, logger="daemon.service"):
        watchdog.start()
        try:
            # Busy and producing tokens: pings as if idle.
            assert len(notify_socket.watchdog_pings(0.2)) >= 2

            worker.freeze()
            # Within stall_s the pings go on (at most one per interval, plus one in flight)...
            stalling = notify_socket.watchdog_pings(0.6)
            assert 1 <= len(stalling) <= stall_s / interval_s + 3
            # ...and once the stall is longer, they stop for good.
            assert notify_socket.watchdog_pings(0.3) == []

            worker.ticking = True
            assert notify_socket.receive(timeout_s=1.0) == "WATCHDOG=1"
        finally:
            watchdog.stop()

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "a stall is logged once, not at every check"
    assert "no progress" in errors[0].getMessage()
    assert any("resumed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.usefixtures("no_watchdog_threads")
def test_failing_progress_check_withholds_the_ping(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_progress() -> WorkerProgress:
        raise RuntimeError("scheduler lock poisoned")

    watchdog = Watchdog(Notifier(), stall_s=1.0, progress=broken_progress, interval_s=0.05)
    with caplog.at_level(logging.ERROR, logger="daemon.service"):
        watchdog.start()
        try:
            assert notify_socket.watchdog_pings(0.2) == []
        finally:
            watchdog.stop()
    assert any(r.exc_info for r in caplog.records)


@pytest.mark.usefixtures("no_watchdog_threads")
def test_stop_returns_at_once_even_with_a_long_interval(notify_socket: NotifySocket) -> None:
    watchdog = Watchdog(Notifier(), stall_s=1.0, progress=FakeWorker().progress, interval_s=60.0)
    watchdog.start()
    assert notify_socket.receive() == "WATCHDOG=1"

    started = time.monotonic()
    watchdog.stop()
    watchdog.stop()
    assert time.monotonic() - started < 0.5


@pytest.mark.usefixtures("no_watchdog_threads")
def test_watchdog_without_systemd_watchdog_starts_no_thread(notify_socket: NotifySocket) -> None:
    worker = FakeWorker()
    watchdog = Watchdog(Notifier(), stall_s=1.0, progress=worker.progress)
    assert watchdog.interval_s is None

    watchdog.start()
    assert not [t for t in threading.enumerate() if t.name == WATCHDOG_NAME]
    notify_socket.assert_silent()
    assert worker.calls == 0
    watchdog.stop()


@pytest.fixture
def restore_root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_extra_fields_reach_the_journal_as_upper_case_fields() -> None:
    journal = pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    sent: list[tuple[str, dict[str, object]]] = []

    # Named like systemd.journal.send's parameter: JournalHandler passes every record attribute,
    # including a lower-case "message", as a keyword.
    def capture(MESSAGE: str, **fields: object) -> None:  # noqa: N803
        sent.append((MESSAGE, fields))

    handler = journal.JournalHandler(sender_function=capture, SYSLOG_IDENTIFIER="kioskd")
    handler.addFilter(JournalFieldsFilter())
    log = logging.getLogger("kioskd.test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("queue full", extra={"request_id": "r-17", "code": "busy", "position": 9})
    finally:
        log.removeHandler(handler)

    [(message, fields)] = sent
    assert message == "queue full"
    assert fields["REQUEST_ID"] == "r-17"
    assert fields["CODE"] == "busy"
    assert fields["POSITION"] == "9"
    assert fields["PRIORITY"] == "4"


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_uses_journald_under_systemd() -> None:
    journal = pytest.importorskip("systemd.journal", reason="systemd-python is not installed")

    setup_logging("info", environ={"INVOCATION_ID": "0123", "JOURNAL_STREAM": "8:1234"})

    root = logging.getLogger()
    [handler] = [h for h in root.handlers if isinstance(h, journal.JournalHandler)]
    assert any(isinstance(f, JournalFieldsFilter) for f in handler.filters)
    assert root.level == logging.INFO


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_writes_compact_lines_with_fields_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("debug", environ={})
    setup_logging("debug", environ={})  # a second call replaces, not duplicates, the handler

    logging.getLogger("kioskd.scheduler").warning(
        "rejected", extra={"request_id": "r-17", "code": "busy"}
    )

    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING kioskd.scheduler: rejected [request_id=r-17 code=busy]")
    assert line[:4].isdigit()


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_without_systemd_python_keeps_priority_for_journald(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "systemd.journal", None)
    setup_logging("info", environ={"JOURNAL_STREAM": "8:1234", "INVOCATION_ID": "0123"})

    logging.getLogger("kioskd.engine").error("model failed", extra={"code": "model_error"})
    logging.getLogger("kioskd.engine").debug("not shown at info")

    [line] = capsys.readouterr().err.splitlines()
    assert line == "<3>kioskd.engine: model failed [code=model_error]"


def test_setup_logging_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose", environ={})
