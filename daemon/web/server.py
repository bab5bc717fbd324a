"""`kioskd web`: serves the touch page and relays between browsers (WebSocket) and the kiosk.

A browser can only ask, cancel its own question and read the status bar: the service picks
every topic and every request id, and accepts nothing else from the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from daemon import exitcodes
from daemon.config import Config, ConfigError, is_loopback, parse_listen, remote_listen_problem
from daemon.messages import ID_PATTERN
from daemon.web.relay import KioskView, RefusedError, Relay

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Browsers that may be connected at once; each holds at most one question.
MAX_SESSIONS = 32
# A message the page sends is small JSON: a question of at most a few thousand characters.
MAX_MESSAGE_BYTES = 64 * 1024
# Messages waiting for one slow browser: a whole answer's chunks fit.
MAX_OUTBOX = 4096
# The page counts the connection as dead after 2.5 of these without any message.
PING_S = 20.0

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_RELAY = web.AppKey("relay", Relay)
_SOCKETS = web.AppKey("sockets", set[web.WebSocketResponse])
_LOOPBACK_ONLY = web.AppKey("loopback_only", bool)
_MAX_QUESTION_CHARS = web.AppKey("max_question_chars", int)


def build_app(relay: Relay, *, loopback_only: bool, max_question_chars: int) -> web.Application:
    """The page, its two assets, and the WebSocket at /ws."""
    app = web.Application(middlewares=[_check_host], client_max_size=MAX_MESSAGE_BYTES)
    app[_RELAY] = relay
    app[_SOCKETS] = set()
    app[_LOOPBACK_ONLY] = loopback_only
    app[_MAX_QUESTION_CHARS] = max_question_chars
    app.router.add_get("/", _index)
    app.router.add_get("/ws", _socket)
    app.router.add_static("/static/", STATIC_DIR)
    app.on_response_prepare.append(_add_headers)
    app.on_shutdown.append(_close_sockets)
    return app


@web.middleware
async def _check_host(request: web.Request, handler: Any) -> web.StreamResponse:
    # DNS rebinding: a web site whose name resolves to 127.0.0.1 would otherwise be same-origin
    # with this page. On loopback only loopback names are served.
    if request.app[_LOOPBACK_ONLY]:
        try:
            host = request.url.host or ""
        except ValueError:
            host = ""
        if not is_loopback(host):
            raise web.HTTPForbidden(text="kioskd web: this page is served to loopback names only")
    response: web.StreamResponse = await handler(request)
    return response


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_HEADERS)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _close_sockets(app: web.Application) -> None:
    sockets: set[web.WebSocketResponse] = app[_SOCKETS]
    for socket in list(sockets):
        await socket.close(code=1001, message=b"kioskd web is stopping")


async def _socket(request: web.Request) -> web.StreamResponse:
    # Browsers send Origin on every WebSocket: another site's page must not drive this one.
    origin = request.headers.get("Origin", "")
    if origin.lower() != f"{request.scheme}://{request.host}".lower():
        log.warning("refused a WebSocket from origin %r", origin)
        raise web.HTTPForbidden(text="kioskd web: cross-origin WebSocket refused")
    if len(request.app[_SOCKETS]) >= MAX_SESSIONS:
        raise web.HTTPServiceUnavailable(text="kioskd web: too many screens connected")
    socket = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=PING_S)
    await socket.prepare(request)
    request.app[_SOCKETS].add(socket)
    try:
        await Session(socket, request.app[_RELAY], request.app[_MAX_QUESTION_CHARS]).run()
    finally:
        request.app[_SOCKETS].discard(socket)
    return socket


class Session:
    """One browser: its outbox, and the one question it may have running."""

    def __init__(self, socket: web.WebSocketResponse, relay: Relay, max_question_chars: int):
        self._socket = socket
        self._relay = relay
        self._max_question_chars = max_question_chars
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_OUTBOX)
        self.request_id: str | None = None
        self._closing: asyncio.Task[bool] | None = None

    async def run(self) -> None:
        unwatch = self._relay.watch(self._show)
        writer = asyncio.create_task(self._write())
        self.send({"type": "hello", "max_question_chars": self._max_question_chars})
        self._show(self._relay.view)
        try:
            async for message in self._socket:
                if message.type != WSMsgType.TEXT:
                    break
                self._handle(message.data)
        finally:
            unwatch()
            if self.request_id is not None:
                self._relay.abandon(self.request_id)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def send(self, message: dict[str, Any]) -> None:
        if self._closing is not None:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("a browser does not read its messages; closing its connection")
            self._closing = asyncio.get_running_loop().create_task(self._socket.close(code=1011))

    def _show(self, view: KioskView) -> None:
        self.send(view.to_message())

    async def _write(self) -> None:
        while not self._socket.closed:
            try:
                message = await asyncio.wait_for(self._outbox.get(), PING_S)
            except TimeoutError:
                message = {"type": "ping"}
            with contextlib.suppress(ConnectionError):
                await self._socket.send_str(json.dumps(message, ensure_ascii=False))

    def _handle(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "ask" and isinstance(message, dict):
            self._ask(message)
        elif kind == "cancel":
            if self.request_id is not None:
                self._relay.cancel(self.request_id)
        else:
            self.send(_refusal("invalid", "The page sent something this service does not know."))

    def _ask(self, message: dict[str, Any]) -> None:
        question = message.get("question")
        conversation_id = message.get("conversation_id")
        if not isinstance(question, str) or not question.strip():
            self.send(_refusal("invalid", "Type a question first."))
        elif len(question) > self._max_question_chars:
            self.send(
                _refusal("invalid", f"The question is longer than {self._max_question_chars}.")
            )
        elif conversation_id is not None and not (
            isinstance(conversation_id, str) and ID_PATTERN.fullmatch(conversation_id)
        ):
            self.send(_refusal("invalid", "The page sent a malformed conversation id."))
        else:
            if self.request_id is not None:
                # A new question replaces the open one (the page's "New conversation").
                self._relay.abandon(self.request_id)
                self.request_id = None
            try:
                request_id = self._relay.ask(question, conversation_id, self._deliver)
            except RefusedError as refusal:
                self.send(_refusal(refusal.code, refusal.message, refusal.retry_after_s))
                return
            self.request_id = request_id
            self.send({"type": "accepted", "id": request_id})

    def _deliver(self, request_id: str, message: dict[str, Any]) -> None:
        if message.get("type") in ("done", "error") and request_id == self.request_id:
            self.request_id = None
        self.send({**message, "id": request_id})


def _refusal(code: str, message: str, retry_after_s: float | None = None) -> dict[str, Any]:
    """An error of this service, before any question went to the kiosk."""
    refusal: dict[str, Any] = {"type": "refused", "code": code, "message": message}
    if retry_after_s is not None:
        refusal["retry_after_s"] = round(retry_after_s, 1)
    return refusal


def run(config: Config, listen: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT; the exit code for `kioskd web`."""
    listen = listen or config.web.listen
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        print(f"kioskd web: --listen {listen}: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    problem = remote_listen_problem(listen, allow_remote=config.web.allow_remote)
    if problem:
        print(f"kioskd web: refusing to listen on {listen}: {problem}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    try:
        return asyncio.run(_serve(config, host, port))
    except ConfigError as exc:  # an unreadable password file or certificate
        for line in exc.problems:
            print(line, file=sys.stderr)
        return exitcodes.CONFIG_ERROR


async def _serve(config: Config, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(config, loop)
    relay.start()
    app = build_app(
        relay,
        loopback_only=is_loopback(host),
        max_question_chars=config.limits.max_question_chars,
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            return exitcodes.FAILURE
        shown = f"[{host}]" if ":" in host else host
        log.info("kiosk screen on http://%s:%d/ for %s", shown, port, relay.topics.prefix)
        await stop.wait()
        log.info("stopping")
        return exitcodes.OK
    finally:
        await runner.cleanup()
        relay.stop()
