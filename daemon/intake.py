"""Questions arriving on P/ask: validate, route errors, de-duplicate, hand to the scheduler.

Each question's PUBACK is held until its terminal message has been delivered (docs/protocol.md,
"Crash safety"), so every path below ends in a stream or a publish that acknowledges it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from daemon.config import Config
from daemon.jobs import Job
from daemon.ledger import PacketLedger, RecentAnswers, digest
from daemon.loglimit import LogLimiter
from daemon.messages import (
    Done,
    ErrorCode,
    Request,
    RequestError,
    StreamMessage,
    duplicate_id_payload,
)
from daemon.outlet import ConnectionOutlet, IntakeConnection
from daemon.packets import JSON, Inbound
from daemon.ratelimit import RateLimiter
from daemon.replyroutes import ReplyRoutes
from daemon.scheduler import Scheduler
from daemon.stream import ReplyStream
from daemon.topics import Topics
from daemon.validation import parse_request

log = logging.getLogger(__name__)


class Intake:
    """Turns each P/ask message into exactly one accepted job or one error reply."""

    def __init__(
        self,
        config: Config,
        topics: Topics,
        scheduler: Scheduler,
        connection: IntakeConnection,
        *,
        packets: PacketLedger,
        answers: RecentAnswers,
        device: str,
        reply_prefixes: tuple[str, ...] | None = None,
    ) -> None:
        """One intake per ask topic: the kiosk's own P/ask, and F/ask in a fleet (with its own
        connection, packet ids and topics; the recent answers are shared). The daemon passes
        its broker Connection; a unit test, a recorder of its own."""
        self._config = config
        self._topics = topics
        self._scheduler = scheduler
        self._connection = connection
        self._outlet = ConnectionOutlet(connection)
        self._packets = packets
        self._answers = answers
        self._device = device
        self._routes = ReplyRoutes(topics, reply_prefixes or config.reply_prefixes, self._outlet)
        self._log = LogLimiter(log)
        self._rate_limiter: RateLimiter | None = None
        self.set_rate(config.limits.max_requests_per_s)

    def set_rate(self, max_requests_per_s: float | None) -> None:
        """Apply limits.max_requests_per_s (also on a reload)."""
        self._rate_limiter = RateLimiter(max_requests_per_s) if max_requests_per_s else None

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: take the new limits section (the rest of `config` needs a restart)."""
        if config.limits.max_requests_per_s != self._config.limits.max_requests_per_s:
            self.set_rate(config.limits.max_requests_per_s)
        self._config = dataclasses.replace(self._config, limits=config.limits)

    def refuse_retained(self, message: Inbound) -> None:
        """A retained question: the broker would hand it over at every (re)subscribe."""
        request_id = None
        try:
            request = self._parse(message)
            request_id = request.id if request.id_chosen else None
        except RequestError as exc:
            request_id = exc.request_id
        error = RequestError(
            ErrorCode.INVALID_REQUEST,
            "retain: retained questions are not answered, since the broker would ask them again "
            "at every reconnect; publish the question without retain, and clear this one with "
            "an empty retained message",
            request_id,
        )
        self._log.log(
            logging.WARNING,
            "retained",
            "refused a retained question on %s (id %s)",
            message.topic,
            request_id,
        )
        if message.qos > 0:
            self._packets.hold(message.mid, message.payload)
        self._scheduler.reject(
            self._stream(self._routes.error_topic(error, message), request_id, message), error
        )

    def dispatch(self, message: Inbound, others: Callable[[Inbound], None]) -> None:
        """Network thread: every message of this intake's connection. A question is
        acknowledged once answered; anything else goes to `others`, then is acknowledged."""
        if message.topic == self._topics.ask:
            if message.retain:
                self.refuse_retained(message)
            else:
                self.handle(message)
            return
        try:
            others(message)
        finally:
            self._connection.acknowledge(message)

    def handle(self, message: Inbound) -> None:
        """Called on the network thread for every message on P/ask."""
        if message.dup:
            seen = self._packets.redelivery(message.mid, message.payload)
            if seen is not None:
                log.info(
                    "the broker sent question packet %d again; it is %s, not answered twice",
                    message.mid,
                    "in hand" if seen == "held" else "answered already",
                )
                if seen == "released":
                    self._acknowledger(message)()  # our PUBACK was lost on the way
                return
        if message.qos > 0:
            self._packets.hold(message.mid, message.payload)
        acknowledge = self._acknowledger(message)
        try:
            request = self._parse(message)
        except RequestError as exc:
            self._log.log(
                logging.INFO,
                "invalid",
                "rejected a request (%s): %s",
                exc.code,
                exc.message,
                extra={"request_id": exc.request_id, "code": str(exc.code)},
            )
            stream = self._stream(self._routes.error_topic(exc, message), exc.request_id, message)
            self._scheduler.reject(stream, exc)
            return
        topic = self._reply_topic(request, message)
        if topic is None:
            return
        if self._scheduler.is_active(request.id):
            self._refuse_duplicate(request, message, acknowledge)
            return
        if request.id_chosen and self._answered_already(request, message, topic, acknowledge):
            return
        wait_s = self._rate_limited(message)
        if wait_s is not None:
            self._scheduler.reject_busy(self._stream(topic, request.id, message), wait_s)
            return
        log.debug("request %s: %r", request.id, request.question, extra={"request_id": request.id})
        if message.dup:
            log.info(
                "request %s was sent again by the broker (kioskd restarted or lost it); "
                "answering it from the start",
                request.id,
                extra={"request_id": request.id},
            )
        self._scheduler.submit(Job(request, self._stream(topic, request.id, message, request)))

    # --- where replies go -----------------------------------------------------------------

    def _reply_topic(self, request: Request, message: Inbound) -> str | None:
        """The stream's topic; None when the request has been refused here instead."""
        route = self._routes.reply_topic(request, message)
        if isinstance(route, str):
            return route
        error = route.error
        extra = {"request_id": request.id, "code": str(error.code)}
        if error.code is ErrorCode.FORBIDDEN_REPLY_TOPIC:
            self._log.log(
                logging.WARNING,
                "forbidden",
                "request %s asked for forbidden reply topic %r",
                request.id,
                message.response_topic,
                extra=extra,
            )
        else:
            log.warning(
                "request %s refused: %s%s",
                request.id,
                error.message,
                "" if route.correlation_data else "; its error goes without the correlation data",
                extra=extra,
            )
        stream = self._stream(
            route.topic,
            error.request_id,
            message,
            correlation_data=route.correlation_data,
            max_message_bytes=route.max_message_bytes,
        )
        self._scheduler.reject(stream, error)
        return None

    # --- ids seen before --------------------------------------------------------------------

    def _refuse_duplicate(
        self, request: Request, message: Inbound, acknowledge: Callable[[], None]
    ) -> None:
        """A second request under a running or queued id: refused apart from its stream."""
        if message.dup:
            acknowledge()  # the broker's copy of a question we hold under another packet id
            return
        topic = self._routes.duplicate_topic(message)
        self._log.log(
            logging.WARNING,
            "duplicate",
            "request %s refused: duplicate_id (that id is running or queued; refusal on %s)",
            request.id,
            topic,
            extra={"request_id": request.id, "code": str(ErrorCode.DUPLICATE_ID)},
        )
        self._scheduler.count_refusal()
        self._publish_once(
            topic, duplicate_id_payload(request.id, self._device), message, acknowledge
        )

    def _answered_already(
        self, request: Request, message: Inbound, topic: str, acknowledge: Callable[[], None]
    ) -> bool:
        """A retry of an id that ended within limits.dedup_s gets its terminal message again."""
        finished = self._answers.recent(request.id)
        if finished is None:
            return False
        if message.dup:
            acknowledge()  # the broker's copy of a question answered already
            return True
        if finished.question_digest != _question_digest(request):
            self._answers.forget(request.id)
            return False  # the id is reused for a new question
        log.info(
            "request %s was asked again with the same question; sending its terminal message "
            "again instead of a second answer",
            request.id,
            extra={"request_id": request.id},
        )
        self._publish_once(topic, finished.terminal_payload, message, acknowledge)
        return True

    def _publish_once(
        self, topic: str, payload: bytes, message: Inbound, acknowledge: Callable[[], None]
    ) -> None:
        sent = self._connection.publish(
            topic,
            payload,
            correlation_data=message.correlation_data,
            content_type=JSON,
            on_delivered=acknowledge,
        )
        if sent.refused:
            acknowledge()

    # --- plumbing -------------------------------------------------------------------------

    def _parse(self, message: Inbound) -> Request:
        limits = self._config.limits
        return parse_request(
            message.payload,
            max_payload_bytes=limits.max_payload_bytes,
            max_question_chars=limits.max_question_chars,
            max_schema_bytes=limits.max_schema_bytes,
        )

    def _rate_limited(self, message: Inbound) -> float | None:
        """Seconds the sender must wait, or None; see docs/security.md for who "sender" is."""
        if self._rate_limiter is None:
            return None
        sender = dict(message.user_properties).get("client_id", "*")
        return self._rate_limiter.allow(sender)

    def _acknowledger(self, message: Inbound) -> Callable[[], None]:
        packets, connection = self._packets, self._connection

        def acknowledge() -> None:
            packets.release(message.mid)
            connection.acknowledge(message)

        return acknowledge

    def _stream(
        self,
        topic: str,
        request_id: str | None,
        message: Inbound,
        request: Request | None = None,
        *,
        correlation_data: bool = True,
        max_message_bytes: int | None = None,
    ) -> ReplyStream:
        """The reply stream of `message`; with `request`, of an accepted one (remembered)."""
        on_end = None
        if request is not None and request.id_chosen:
            answers = self._answers

            def on_end(terminal: StreamMessage, payload: bytes) -> None:
                # Only answers are sent again to a retry: a refusal says to try again.
                if isinstance(terminal, Done):
                    answers.finished(request.id, request.question, payload)

        return ReplyStream(
            self._outlet,
            topic,
            request_id,
            message.correlation_data if correlation_data else None,
            streaming=request.stream if request is not None else True,
            max_message_bytes=request.max_message_bytes
            if request is not None
            else max_message_bytes,
            restart=message.dup,
            on_end=on_end,
            on_delivered=self._acknowledger(message),
            device=self._device,
        )


def _question_digest(request: Request) -> bytes:
    return digest(request.question.encode("utf-8"))
