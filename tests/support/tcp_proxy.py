"""A loopback TCP proxy that can be switched into a network partition (a blackhole) and back.

While partitioned nothing crosses: no bytes and no FIN. Every connection open when the partition
starts, and every one accepted during it, stays frozen for good: its bytes are read and dropped,
so neither end notices anything but silence, and only MQTT keepalive can tell it is dead. Once
the partition heals, new connections are forwarded again. A frozen connection is closed when both
of its ends have given up on it, or when the proxy closes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_POLL_S = 0.1
_CHUNK_BYTES = 65536
_LOOPBACK = "127.0.0.1"


@dataclass
class _Link:
    """One client connection and, unless it was born partitioned, its upstream connection."""

    downstream: socket.socket
    upstream: socket.socket | None
    frozen: bool = False
    ends_closed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.downstream, self.upstream) if s is not None]

    def close(self) -> None:
        for sock in self.sockets():
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` until told to blackhole."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((_LOOPBACK, 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._partitioned = False
        self._closed = threading.Event()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self._spawn(self._accept_loop, "proxy-accept")

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def blackhole(self) -> None:
        """Start a partition: freeze every open connection, and every new one, silently."""
        with self._lock:
            self._partitioned = True
            for link in self._links:
                link.frozen = True

    def heal(self) -> None:
        """End the partition: connections made from now on are forwarded again."""
        with self._lock:
            self._partitioned = False

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        # Threads first: the accept loop may still add a link, which must be closed too.
        # The accept thread is the first; once it is gone no thread is added any more.
        self._threads[0].join(timeout=2)
        for thread in list(self._threads[1:]):
            thread.join(timeout=2)
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    # --- threads ---------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], _POLL_S)
                if not ready:
                    continue
                downstream, _address = self._listener.accept()
            except (OSError, ValueError):  # the listener was closed
                return
            with self._lock:
                partitioned = self._partitioned
            upstream = None
            if not partitioned:
                try:
                    upstream = socket.create_connection((_LOOPBACK, self.target_port), timeout=5)
                except OSError:
                    downstream.close()  # like a refused connection: the broker is not there
                    continue
            link = _Link(downstream, upstream, frozen=partitioned)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            self._spawn(self._pump, "proxy-down", link, downstream, upstream)
            if upstream is not None:
                self._spawn(self._pump, "proxy-up", link, upstream, downstream)

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket | None) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([source], [], [], _POLL_S)
                if not ready:
                    continue
                data = source.recv(_CHUNK_BYTES)
            except (OSError, ValueError):
                data = b""
            if not data:
                self._end(link)
                return
            if link.frozen or sink is None:
                continue  # partitioned: the bytes vanish
            try:
                sink.sendall(data)
            except OSError:
                self._end(link)
                return

    def _end(self, link: _Link) -> None:
        """One end is gone: a live link closes at once, a frozen one once both ends are gone."""
        with link.lock:
            link.ends_closed += 1
            done = not link.frozen or link.ends_closed >= len(link.sockets())
        if done:
            link.close()
