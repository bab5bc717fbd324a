"""systemd integration: sd_notify readiness and status, the watchdog, journald logging.

Everything here is a no-op when the daemon is not started by systemd (NOTIFY_SOCKET unset), so the
same code runs from a terminal, in tests and under `systemctl`. systemd-python is optional: without
it the notify datagram is written to the socket directly and logs go to stderr.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Final

logger = logging.getLogger(__name__)

# The unit file's WatchdogSec= is 30 s; systemd documents pinging at half the interval.
_WATCHDOG_PING_FRACTION: Final = 0.5


def _optional_module(name: str) -> ModuleType | None:
    """The systemd-python submodule `name`, or None where the package is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class Notifier:
    """Sends sd_notify(3) messages to the service manager; silent when not run by systemd.

    Never raises: a notification that cannot be delivered must not take the daemon down, so the
    first failure is logged as a warning and later ones at debug level.
    """

    def __init__(self) -> None:
        # Read once: the daemon may clear NOTIFY_SOCKET later so that its helpers do not inherit it.
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._libsystemd = _optional_module("systemd.daemon")
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (NOTIFY_SOCKET was set at construction)."""
        return self._address is not None

    def ready(self, status: str) -> None:
        """Tells systemd that start-up is complete (Type=notify), with a status line."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Sets the free-form status shown by `systemctl status`."""
        self._send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        """Tells systemd that a clean shutdown has begun."""
        self._send("STOPPING=1")

    def watchdog_ping(self) -> None:
        """Resets the WatchdogSec= timer."""
        self._send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to ping (half of WATCHDOG_USEC), or None when the watchdog is not for us."""
        usec_text = os.environ.get("WATCHDOG_USEC")
        if not usec_text:
            return None
        pid_text = os.environ.get("WATCHDOG_PID")
        # A WATCHDOG_USEC inherited from a parent service addresses that parent, not us.
        if pid_text and pid_text != str(os.getpid()):
            return None
        try:
            usec = int(usec_text)
        except ValueError:
            logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
            return None
        if usec <= 0:
            return None
        return usec / 1_000_000 * _WATCHDOG_PING_FRACTION

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._libsystemd is not None:
                self._libsystemd.notify(message)
            else:
                _send_datagram(self._address, message)
        except (OSError, ValueError) as error:
            # Once is enough: the watchdog would otherwise repeat this every few seconds for months.
            level = logging.DEBUG if self._failure_logged else logging.WARNING
            self._failure_logged = True
            logger.log(level, "sd_notify to %s failed: %s", self._address, error)


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the notify datagram.
    return " ".join(text.splitlines())


def _send_datagram(address: str, message: str) -> None:
    """sd_notify without libsystemd: one datagram to the AF_UNIX socket in NOTIFY_SOCKET."""
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        raise ValueError(f"unsupported NOTIFY_SOCKET address {address!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), target)


@dataclass(frozen=True, slots=True)
class WorkerProgress:
    """What the watchdog needs to know about the generation worker, sampled atomically."""

    busy: bool
    # time.monotonic() of the last token (or of taking the request, before the first token).
    last_progress_monotonic: float


class Watchdog:
    """Pings the systemd watchdog while the generation worker is healthy.

    A Python thread that merely exists proves nothing about a llama.cpp call stuck in C code, so
    pings are tied to worker progress: while the worker is idle, or busy and has produced a token
    within `stall_s`, WATCHDOG=1 is sent every `interval_s`. Once a generation stalls longer than
    that, pings stop and systemd kills and restarts the daemon after WatchdogSec=.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        stall_s: float,
        progress: Callable[[], WorkerProgress],
        interval_s: float | None = None,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._notifier = notifier
        self._stall_s = stall_s
        self._progress = progress
        self._interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False

    @property
    def interval_s(self) -> float | None:
        """Seconds between pings, or None when no watchdog is configured."""
        return self._interval_s

    def start(self) -> None:
        """Starts pinging in a daemon thread; does nothing when systemd set no watchdog."""
        if self._interval_s is None:
            logger.debug("systemd watchdog not enabled; not pinging")
            return
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(self._interval_s,), name="kioskd-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops pinging and waits for the thread; safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self, interval_s: float) -> None:
        # Ping at once: start() usually follows READY=1, which is when systemd arms the timer.
        while True:
            if self._healthy():
                self._notifier.watchdog_ping()
            if self._stop.wait(interval_s):
                return

    def _healthy(self) -> bool:
        try:
            progress = self._progress()
        except Exception:
            # A broken progress source means the scheduler is broken: let systemd restart us.
            logger.exception("watchdog progress check failed; withholding the ping")
            return False
        stalled_s = time.monotonic() - progress.last_progress_monotonic
        stalled = progress.busy and stalled_s > self._stall_s
        if stalled and not self._stalled:
            logger.error(
                "generation made no progress for %.0f s (stall_s=%g); stopping watchdog pings "
                "so that systemd restarts the daemon",
                stalled_s,
                self._stall_s,
            )
        elif self._stalled and not stalled:
            logger.warning("generation is progressing again; watchdog pings resumed")
        self._stalled = stalled
        return not stalled


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}
# Fields JournalHandler (systemd-python 235) sets itself; an extra with one of these names would
# make its send() fail with a duplicate keyword argument.
_JOURNAL_RESERVED: Final = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "LOGGER",
        "THREAD_NAME",
        "PROCESS_NAME",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "CODE_ARGS",
        "EXCEPTION_TEXT",
        "EXCEPTION_INFO",
        "SYSLOG_IDENTIFIER",
    }
)
_SYSLOG_IDENTIFIER: Final = "kioskd"
_STDERR_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT: Final = "%(name)s: %(message)s"


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The `extra=` attributes of a record, e.g. {"request_id": "a1", "code": "busy"}."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES
        and key.isidentifier()
        and key[0].isalpha()
        and key == key.lower()
        and value is not None
    }


class JournalFieldsFilter(logging.Filter):
    """Gives `extra=` attributes upper-case names so that they survive as journal fields.

    systemd-python's JournalHandler passes every record attribute on as a field, but journald
    drops fields whose names are not upper case, so `extra={"request_id": ...}` would vanish.
    With this filter it arrives as REQUEST_ID= (`journalctl REQUEST_ID=...` then finds it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _extra_fields(record).items():
            field = key.upper()
            if field not in _JOURNAL_RESERVED:
                setattr(record, field, value if isinstance(value, str | bytes) else str(value))
        return True


class _StderrFormatter(logging.Formatter):
    """A compact line, with `extra=` fields appended as key=value."""

    def __init__(self, *, syslog_prefix: bool) -> None:
        # journald already stamps time; it also reads a "<3>" prefix as the priority.
        super().__init__(_JOURNAL_FORMAT if syslog_prefix else _STDERR_FORMAT)
        self._syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={_field_text(value)}" for key, value in _extra_fields(record).items()
        )
        if fields:
            line = f"{line} [{fields}]"
        if self._syslog_prefix:
            line = f"<{_syslog_priority(record.levelno)}>{line}"
        return line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        seconds = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{seconds}.{int(record.msecs):03d}"


def _field_text(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"'[]=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


_installed_handlers: list[logging.Handler] = []


def setup_logging(level: str, *, environ: Mapping[str, str] | None = None) -> None:
    """Sends the root logger to journald under systemd, otherwise to stderr.

    `level` is a logging level name (debug, info, warning, error). Calling it again replaces the
    handler it installed before, and leaves handlers installed by others (pytest) alone.
    """
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")
    env = os.environ if environ is None else environ
    under_systemd = bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))
    journal = _optional_module("systemd.journal") if under_systemd else None

    handler: logging.Handler
    if journal is not None:
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=_SYSLOG_IDENTIFIER)
        handler.addFilter(JournalFieldsFilter())
        handler.setFormatter(logging.Formatter(_JOURNAL_FORMAT))
    else:
        # Under systemd without systemd-python stderr still reaches the journal; the "<N>" prefix
        # keeps the priority.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter(syslog_prefix=bool(env.get("JOURNAL_STREAM"))))

    root = logging.getLogger()
    for old in _installed_handlers:
        root.removeHandler(old)
        old.close()
    _installed_handlers[:] = [handler]
    root.addHandler(handler)
    root.setLevel(levelno)
