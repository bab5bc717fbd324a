"""The web service's MQTT side: one client of the kiosk, shared by every browser on the page.

Like `kioskd ask`, it subscribes to an answer topic before it asks. It also keeps the kiosk's
retained status and health for the status bar. paho calls back on its own thread; everything
here is handed over to the asyncio loop first, so the relay's state has one owner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from daemon.broker import Connection
from daemon.config import Config
from daemon.packets import Inbound
from daemon.ratelimit import RateLimiter
from daemon.topics import Topics

log = logging.getLogger(__name__)

# What of a kiosk's stream message goes on to the browser; the rest stays here.
_FORWARDED = (
    "type",
    "text",
    "position",
    "finish_reason",
    "code",
    "message",
    "retry_after_s",
    "timing",
    "restart",
)

# Questions per second from all pages together, with bursts of this many: more than people at a
# few screens ask (Ask, Stop, Ask again), far less than a script on the WebSocket could send.
ASKS_PER_S = 5.0

# Called with the request id and a message of its stream.
Deliver = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class KioskView:
    """What the status bar shows; None where it is not known (yet)."""

    broker: bool = False
    status: str | None = None
    state: str | None = None
    cpu_c: float | None = None
    throttled: bool | None = None
    queue_depth: int | None = None
    queue_capacity: int | None = None

    def to_message(self) -> dict[str, Any]:
        return {"type": "kiosk", **asdict(self)}


class RefusedError(Exception):
    """A question the relay does not send; `code` and `message` go to the page as they are."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class _Pending:
    deliver: Deliver
    next_seq: int = 0


class Relay:
    """The kiosk's status, health and answer streams, for sessions on one asyncio loop."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.topics = Topics(config.topic_prefix)
        self.view = KioskView()
        self._loop = loop
        self._pending: dict[str, _Pending] = {}
        self._watchers: list[Callable[[KioskView], None]] = []
        self._was_connected = False
        self._limiter = RateLimiter(ASKS_PER_S)
        mqtt = config.mqtt
        self.connection = Connection(
            host=mqtt.host,
            port=mqtt.port,
            # Its own id beside the daemon's: a shared id would make the two take turns.
            client_id=f"{config.client_id}-web-{secrets.token_hex(3)}",
            protocol=mqtt.protocol,
            keepalive_s=mqtt.keepalive_s,
            subscriptions=[self.topics.status, self.topics.health],
            on_message=self._from_network,
            on_connected=lambda: self._hand_over(self._connected),
            on_problem=lambda _problem: self._hand_over(self._broker_changed),
            reconnect_min_s=mqtt.reconnect_min_s,
            reconnect_max_s=mqtt.reconnect_max_s,
            username=mqtt.username,
            password=config.mqtt_password(),
            tls_context=mqtt.tls.ssl_context(),
        )

    def start(self) -> None:
        self.connection.start()

    def stop(self) -> None:
        for request_id in list(self._pending):
            self.cancel(request_id)
        self.connection.stop()

    def watch(self, watcher: Callable[[KioskView], None]) -> Callable[[], None]:
        """Call `watcher` on every change of the view; returns the function that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def ask(self, question: str, conversation_id: str | None, deliver: Deliver) -> str:
        """Send a question to P/ask; its stream goes to `deliver`. Raises RefusedError."""
        if not self.view.broker:
            raise RefusedError("no_broker", "The screen cannot reach the kiosk's broker.")
        if self.view.status != "online":
            raise RefusedError("offline", "The kiosk is offline.")
        wait_s = self._limiter.allow("pages")
        if wait_s is not None:
            raise RefusedError("busy", "Too many questions from the pages.", wait_s)
        request_id = f"web-{secrets.token_hex(6)}"
        request: dict[str, Any] = {"id": request_id, "question": question}
        if conversation_id is not None:
            # A kiosk without conversations ignores it (docs/protocol.md: unknown fields are).
            request["conversation_id"] = conversation_id
        self._pending[request_id] = _Pending(deliver)
        self.connection.subscribe(self.topics.answer(request_id))
        self.connection.publish(self.topics.ask, json.dumps(request).encode("utf-8"))
        return request_id

    def cancel(self, request_id: str) -> None:
        """Ask the kiosk to stop; the stream still ends with its own `done` (cancelled)."""
        if request_id in self._pending:
            self.connection.publish(self.topics.cancel, json.dumps({"id": request_id}).encode())

    def abandon(self, request_id: str) -> None:
        """The browser is gone: stop the answer and forget it."""
        self.cancel(request_id)
        self._finish(request_id)

    # --- on the loop ------------------------------------------------------------------------

    def _hand_over(self, callback: Callable[..., None], *args: Any) -> None:
        """From paho's thread to the loop (a closed loop means we are shutting down)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            log.debug("event loop closed; dropped an MQTT event")

    def _from_network(self, message: Inbound) -> None:
        self._hand_over(self._received, message)

    def _connected(self) -> None:
        if self._was_connected:
            # Answers sent while we were away are lost (clean session): end those questions.
            self._end_all("interrupted", "The connection to the kiosk was interrupted.")
        self._was_connected = True
        self._broker_changed()

    def _broker_changed(self) -> None:
        if self.connection.connected:
            self._set_view(broker=True)
        else:
            # Without the broker, the retained status we hold may be stale.
            self._set_view(broker=False, status=None)

    def _received(self, message: Inbound) -> None:
        try:
            if message.topic == self.topics.status:
                self._status(message.payload.decode("utf-8", "replace").strip())
            elif message.topic == self.topics.health:
                self._health(json.loads(message.payload))
            elif message.topic.startswith(self.topics.answer_prefix):
                self._stream(message.topic[len(self.topics.answer_prefix) :], message.payload)
        except (ValueError, TypeError, AttributeError, KeyError):
            log.warning("unreadable message on %s", message.topic)

    def _status(self, status: str) -> None:
        self._set_view(status=status if status in ("online", "offline") else None)
        if status == "offline":
            for request_id in list(self._pending):
                self.cancel(request_id)  # so that a kiosk back soon does not answer into the void
            self._end_all("offline", "The kiosk went offline.")

    def _health(self, health: dict[str, Any]) -> None:
        thermal = health.get("thermal") or {}
        queue = health.get("queue") or {}
        state = health.get("state")
        if not isinstance(state, str):
            state = None
        # The kiosk's own back-off, or the Pi firmware's flag (null off a Pi).
        firmware = (thermal.get("throttled") or {}).get("now") is True
        self._set_view(
            state=state,
            cpu_c=_number(thermal.get("cpu_c")),
            throttled=None if state is None else state == "throttled" or firmware,
            queue_depth=_whole(queue.get("depth")),
            queue_capacity=_whole(queue.get("capacity")),
        )

    def _stream(self, request_id: str, payload: bytes) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return  # an answer already ended, or one asked by someone else
        message = json.loads(payload)
        if not isinstance(message, dict):
            raise ValueError("not an object")
        seq = message.get("seq")
        if message.get("restart"):
            pending.next_seq = 0
        if isinstance(seq, int):
            if seq != pending.next_seq:
                log.warning("answer %s: seq %d instead of %d", request_id, seq, pending.next_seq)
                self.abandon(request_id)
                pending.deliver(request_id, _error("interrupted", "Part of the answer was lost."))
                return
            pending.next_seq = seq + 1
        pending.deliver(request_id, {k: message[k] for k in _FORWARDED if k in message})
        if message.get("type") in ("done", "error"):
            self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self.connection.unsubscribe(self.topics.answer(request_id))

    def _end_all(self, code: str, text: str) -> None:
        for request_id, pending in list(self._pending.items()):
            self._finish(request_id)
            pending.deliver(request_id, _error(code, text))

    def _set_view(self, **changes: Any) -> None:
        view = replace(self.view, **changes)
        if view == self.view:
            return
        self.view = view
        for watcher in list(self._watchers):
            watcher(view)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
