"""Questions arriving on P/ask: validate, route errors, rate-limit, hand to the scheduler."""

from __future__ import annotations

import logging

from daemon.broker import Connection, Delivery, Inbound
from daemon.config import Config
from daemon.messages import ErrorCode, RequestError, parse_request
from daemon.ratelimit import RateLimiter
from daemon.scheduler import Job, Scheduler
from daemon.stream import ReplyStream
from daemon.topics import Topics, is_allowed_reply_topic

log = logging.getLogger(__name__)


class Intake:
    """Turns each P/ask message into exactly one accepted job or one error reply."""

    def __init__(
        self, config: Config, topics: Topics, scheduler: Scheduler, connection: Connection
    ) -> None:
        self._config = config
        self._topics = topics
        self._scheduler = scheduler
        self._connection = connection
        rate = config.limits.max_requests_per_s
        self._rate_limiter = RateLimiter(rate) if rate is not None else None

    def handle(self, message: Inbound) -> None:
        """Called on the network thread for every message on P/ask."""
        limits = self._config.limits
        response_topic = message.response_topic
        forbidden = response_topic is not None and not is_allowed_reply_topic(
            response_topic, self._config.reply_prefixes
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
            self._scheduler.reject(self._error_stream(exc, response_topic, forbidden, message), exc)
            return
        if forbidden:
            error = RequestError(
                ErrorCode.FORBIDDEN_REPLY_TOPIC,
                f"response topic {response_topic!r} is not allowed; use a topic starting with "
                + " or ".join(repr(p) for p in self._config.reply_prefixes),
                request.id,
            )
            log.warning(
                "request %s asked for forbidden reply topic %r",
                request.id,
                response_topic,
                extra={"request_id": request.id, "code": str(error.code)},
            )
            stream = self._stream(self._topics.answer(request.id), request.id, message)
            self._scheduler.reject(stream, error)
            return
        topic = response_topic or self._topics.answer(request.id)
        wait_s = self._rate_limited(message)
        if wait_s is not None:
            self._scheduler.reject_busy(self._stream(topic, request.id, message), wait_s)
            return
        if self._scheduler.is_active(request.id):
            # Its P/answer/{id} belongs to the request already running: refuse on P/error so
            # that stream keeps exactly one terminal message.
            duplicate = RequestError(
                ErrorCode.INVALID_REQUEST,
                f"id: {request.id} is already running or queued; use a new id per question",
                request.id,
            )
            stream = self._stream(self._topics.error, request.id, message)
            self._scheduler.reject(stream, duplicate)
            return
        log.debug("request %s: %r", request.id, request.question, extra={"request_id": request.id})
        self._scheduler.submit(Job(request, self._stream(topic, request.id, message)))

    def _rate_limited(self, message: Inbound) -> float | None:
        """Seconds the sender must wait, or None; see docs/security.md for who "sender" is."""
        if self._rate_limiter is None:
            return None
        sender = dict(message.user_properties).get("client_id", "*")
        return self._rate_limiter.allow(sender)

    def _error_stream(
        self, error: RequestError, response_topic: str | None, forbidden: bool, message: Inbound
    ) -> ReplyStream:
        """Where an invalid request's error goes (docs/protocol.md, "Where errors go")."""
        if error.code is ErrorCode.TOO_LARGE:
            topic = self._topics.error  # PROTOCOL.md: rejected unread, answered on P/error
        elif response_topic is not None and not forbidden:
            topic = response_topic
        elif error.request_id is not None:
            topic = self._topics.answer(error.request_id)
        else:
            topic = self._topics.error
        return self._stream(topic, error.request_id, message)

    def _stream(self, topic: str, request_id: str | None, message: Inbound) -> ReplyStream:
        connection = self._connection

        def publish(topic: str, payload: bytes, correlation_data: bytes | None) -> Delivery:
            return connection.publish(topic, payload, correlation_data=correlation_data)

        return ReplyStream(
            publish, topic, request_id, message.correlation_data, self._max_packet_bytes
        )

    def _max_packet_bytes(self) -> int | None:
        limits = [self._config.mqtt.max_message_bytes, self._connection.max_packet_bytes]
        known = [limit for limit in limits if limit]
        return min(known) if known else None
