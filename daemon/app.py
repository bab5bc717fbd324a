"""Wiring and lifecycle: parts start in order, stop in reverse, one state at a time."""

from __future__ import annotations

import logging
import signal
import threading
from enum import StrEnum
from types import FrameType

from daemon import exitcodes
from daemon.broker import Connection, Delivery, Inbound, Will
from daemon.config import Config
from daemon.engine import Engine, EngineSettings, ModelLoadError, TestHooks
from daemon.messages import Error, ErrorCode, RequestError, parse_cancel, parse_request
from daemon.models import resolve
from daemon.scheduler import Job, Scheduler
from daemon.stream import ReplyStream
from daemon.topics import Topics, is_allowed_reply_topic

log = logging.getLogger(__name__)

# How long shutdown waits for the broker to acknowledge the last messages.
_FLUSH_TIMEOUT_S = 2.0


class State(StrEnum):
    """Lifecycle states, as shown in P/health and systemd's STATUS=."""

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    THROTTLED = "throttled"
    DRAINING = "draining"


class App:
    """One kiosk: broker connection, model, scheduler."""

    def __init__(self, config: Config, hooks: TestHooks | None = None) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self._hooks = hooks if hooks is not None else TestHooks.from_env()
        self._lifecycle = State.STARTING
        self._stop = threading.Event()
        self._engine: Engine | None = None
        self.scheduler = Scheduler(capacity=config.queue.capacity)
        mqtt = config.mqtt
        self.connection = Connection(
            host=mqtt.host,
            port=mqtt.port,
            client_id=config.client_id,
            protocol=mqtt.protocol,
            keepalive_s=mqtt.keepalive_s,
            session_expiry_s=mqtt.session_expiry_s,
            will=Will(self.topics.status, b"offline"),
            subscriptions=[self.topics.ask, self.topics.cancel],
            on_message=self._on_message,
            on_connected=self._on_connected,
            reconnect_min_s=mqtt.reconnect_min_s,
            reconnect_max_s=mqtt.reconnect_max_s,
        )

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._lifecycle is State.READY and self.scheduler.busy:
            return State.BUSY
        return self._lifecycle

    def _enter(self, state: State) -> None:
        if state is not self._lifecycle:
            log.info("state: %s -> %s", self._lifecycle, state)
            self._lifecycle = state

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._install_signal_handlers()
        try:
            return self._start_and_wait()
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def _start_and_wait(self) -> int:
        log.info(
            "kioskd starting: device %s, topics under %s/, broker %s:%s (MQTT %s)",
            self.config.device_id,
            self.topics.prefix,
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.config.mqtt.protocol,
        )
        # Connect first, so questions sent while the model loads are queued, not lost.
        self.connection.start()
        self._enter(State.LOADING)
        try:
            self._engine = self._load_engine()
        except ModelLoadError as exc:
            log.error("%s", exc)
            self._report_fatal(ErrorCode.MODEL_ERROR, str(exc))
            return exitcodes.MODEL_UNAVAILABLE
        if self._stop.is_set():
            return exitcodes.OK
        self.scheduler.start(self._engine)
        self._enter(State.READY)
        self._announce_online()
        self._stop.wait()
        return exitcodes.OK

    def _load_engine(self) -> Engine:
        model = self.config.model
        resolved = resolve(model.path, model.dir)
        log.info("using the %s model %s", resolved.source, resolved.path)
        engine = Engine(
            EngineSettings(
                path=resolved.path,
                threads=self.config.threads,
                threads_batch=self.config.threads_batch,
                ctx=model.ctx,
                max_tokens=model.max_tokens,
                temperature=model.temperature,
                system_prompt=model.system_prompt,
                chat_format=model.chat_format,
                seed=model.seed,
            ),
            self._hooks,
        )
        warm = engine.warm_up()
        log.info(
            "model warm: %d prompt tokens, first token after %s ms",
            warm.prompt_tokens,
            None if warm.first_token_monotonic is None else "ok",
        )
        return engine

    def _shutdown(self) -> None:
        self._enter(State.DRAINING)
        self.scheduler.drain(self.config.shutdown.grace_s)
        offline = self.connection.publish(self.topics.status, b"offline", retain=True)
        if self.connection.connected:
            offline.wait(_FLUSH_TIMEOUT_S)
        self.connection.stop()
        if self._engine is not None:
            self._engine.close()
        log.info("kioskd stopped")

    def _report_fatal(self, code: ErrorCode, message: str) -> None:
        """Tell clients why we are not coming up, when the broker is reachable."""
        if self.connection.wait_connected(_FLUSH_TIMEOUT_S):
            payload = Error(code, message).to_payload(None, 0)
            self.connection.publish(self.topics.error, payload).wait(_FLUSH_TIMEOUT_S)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the app in a thread; they call request_stop() instead

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # --- broker callbacks (network thread) ---------------------------------------------------

    def _announce_online(self) -> Delivery:
        return self.connection.publish(self.topics.status, b"online", retain=True)

    def _on_connected(self) -> None:
        # A broker that restarted without persistence has lost our retained status.
        if self._lifecycle is State.READY:
            self._announce_online()

    def _on_message(self, message: Inbound) -> None:
        if message.topic == self.topics.ask:
            self._intake(message)
        elif message.topic == self.topics.cancel:
            request_id = parse_cancel(message.payload)
            if request_id is None:
                log.warning("ignored a cancel without a valid id")
            elif not self.scheduler.cancel(request_id):
                log.info(
                    "cancel for unknown request %s ignored",
                    request_id,
                    extra={"request_id": request_id},
                )

    def _intake(self, message: Inbound) -> None:
        limits = self.config.limits
        response_topic = message.response_topic
        forbidden = response_topic is not None and not is_allowed_reply_topic(
            response_topic, self.config.reply_prefixes
        )
        try:
            request = parse_request(
                message.payload,
                max_payload_bytes=limits.max_payload_bytes,
                max_question_chars=limits.max_question_chars,
            )
        except RequestError as exc:
            log.info(
                "rejected a request (%s): %s",
                exc.code,
                exc.message,
                extra={"request_id": exc.request_id, "code": str(exc.code)},
            )
            self.scheduler.reject(self._error_stream(exc, response_topic, forbidden, message), exc)
            return
        if forbidden:
            error = RequestError(
                ErrorCode.FORBIDDEN_REPLY_TOPIC,
                f"response topic {response_topic!r} is not allowed; use a topic starting with "
                + " or ".join(repr(p) for p in self.config.reply_prefixes),
                request.id,
            )
            log.warning(
                "request %s asked for forbidden reply topic %r",
                request.id,
                response_topic,
                extra={"request_id": request.id, "code": str(error.code)},
            )
            stream = self._stream(self.topics.answer(request.id), request.id, message)
            self.scheduler.reject(stream, error)
            return
        log.debug("request %s: %r", request.id, request.question, extra={"request_id": request.id})
        topic = response_topic or self.topics.answer(request.id)
        self.scheduler.submit(Job(request, self._stream(topic, request.id, message)))

    def _error_stream(
        self, error: RequestError, response_topic: str | None, forbidden: bool, message: Inbound
    ) -> ReplyStream:
        """Where an invalid request's error goes (docs/protocol.md, "Errors")."""
        if error.code is ErrorCode.TOO_LARGE:
            topic = self.topics.error  # PROTOCOL.md: rejected unread, answered on P/error
        elif response_topic is not None and not forbidden:
            topic = response_topic
        elif error.request_id is not None:
            topic = self.topics.answer(error.request_id)
        else:
            topic = self.topics.error
        return self._stream(topic, error.request_id, message)

    def _stream(self, topic: str, request_id: str | None, message: Inbound) -> ReplyStream:
        connection = self.connection

        def publish(topic: str, payload: bytes, correlation_data: bytes | None) -> Delivery:
            return connection.publish(topic, payload, correlation_data=correlation_data)

        return ReplyStream(publish, topic, request_id, message.correlation_data)
