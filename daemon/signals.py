"""Signals, caught on any thread, acted on by the main thread: stop, reload, log the state.

Python runs signal handlers only when the main thread executes bytecode, and a main thread
blocked on a lock may never see a signal that another thread received. The C handler writes each
signal's number to a socket instead (signal.set_wakeup_fd), and the main loop waits on it with
select().
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

from daemon.loglimit import LogLimiter

log = logging.getLogger(__name__)

_WAKE_UP = 0  # not a signal: wakes the signal loop for request_stop()
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# Every signal whose default action would end kioskd without a word: SIGHUP and SIGUSR1 have
# jobs, the rest are logged and ignored. Faults (SIGSEGV, SIGABRT, ...) stay with faulthandler;
# SIGPIPE is ignored by Python already.
_HANDLED_SIGNALS = (
    *_STOP_SIGNALS,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


class SignalLoop:
    """The main thread's wait for signals; `stop` ends it."""

    def __init__(
        self, stop: threading.Event, *, reload: Callable[[], None], state_dump: Callable[[], str]
    ) -> None:
        """SIGTERM, SIGINT and SIGQUIT set `stop`; SIGHUP calls `reload`; SIGUSR1 logs
        `state_dump()`."""
        self._stop = stop
        self._reload = reload
        self._state_dump = state_dump
        self._log = LogLimiter(log)
        self._inbox, self._outbox = socket.socketpair()
        self._outbox.setblocking(False)

    def install(self) -> None:
        """Route the handled signals to this loop (from the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the app in a thread; they call request_stop() instead

        def handle(signum: int, _frame: FrameType | None) -> None:
            # The work is done by serve, which reads the number from the wakeup
            # socket. A stop is also flagged here for a model load, which does not serve
            # signals; the main thread never waits on this event, so this cannot deadlock.
            if signum in _STOP_SIGNALS:
                self._stop.set()

        signal.set_wakeup_fd(self._outbox.fileno(), warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, handle)

    def wake(self) -> None:
        """Make serve look at `stop` again (it was set by another thread)."""
        with contextlib.suppress(OSError):  # full: the loop is awake already
            self._outbox.send(bytes([_WAKE_UP]))

    def serve(self) -> None:
        """Until stopped: act on the signals the handler queued (it runs between bytecodes of
        this thread, so it only queues; a reload here cannot interrupt itself)."""
        while not self._stop.is_set():
            select.select([self._inbox], [], [])
            for signum in self._inbox.recv(256):
                if signum != _WAKE_UP:
                    self._on_signal(signum)

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        self._inbox.close()
        self._outbox.close()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        try:
            if signum in _STOP_SIGNALS:
                log.info("received %s; stopping", name)
                self._stop.set()
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP; reloading the configuration")
                self._reload()
            elif signum == signal.SIGUSR1:
                log.info("state: %s", self._state_dump())
            else:
                self._log.log(
                    logging.WARNING,
                    f"signal {name}",
                    "received %s; ignored (SIGHUP reloads the configuration, SIGUSR1 logs the "
                    "state, SIGTERM stops)",
                    name,
                )
        except Exception:
            log.exception("handling %s failed; kioskd goes on", name)
