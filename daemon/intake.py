"""Questions arriving on P/ask: validate, route errors, de-duplicate, hand to the scheduler.

Each question's PUBACK is held until its terminal message has been delivered (docs/protocol.md,
"Crash safety"), so every path below ends in a stream or a publish that acknowledges it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from daemon.broker import JSON, Connection, Inbound
from daemon.config import Config
from daemon.ledger import PacketLedger, RecentAnswers, digest
from daemon.loglimit import LogLimiter
from daemon.messages import (
    ConversationInfo,
    Done,
    ErrorCode,
    Request,
    RequestError,
    StreamMessage,
    Timing,
    Usage,
    duplicate_id_payload,
)
from daemon.ratelimit import RateLimiter
from daemon.scheduler import Job, Scheduler
from daemon.stream import ConnectionOutlet, ReplyStream
from daemon.topics import Topics, is_allowed_reply_topic, reply_topic_problem
from daemon.validation import parse_request

log = logging.getLogger(__name__)

# Room a reply needs besides its topic and correlation data: a done with a short text, usage and
# timing. A request whose reply topic and correlation data leave less is refused at intake.
_MIN_REPLY_PAYLOAD_BYTES = 256


class Intake:
    """Turns each P/ask message into exactly one accepted job or one error reply."""

    def __init__(
        self,
        config: Config,
        topics: Topics,
        scheduler: Scheduler,
        connection: Connection,
        *,
        packets: PacketLedger,
        answers: RecentAnswers,
        device: str,
        reply_prefixes: tuple[str, ...] | None = None,
    ) -> None:
        """One intake per ask topic: the kiosk's own P/ask, and F/ask in a fleet (with its own
        connection, packet ids and topics; the recent answers are shared)."""
        self._config = config
        self._topics = topics
        self._scheduler = scheduler
        self._connection = connection
        self._outlet = ConnectionOutlet(connection)
        self._packets = packets
        self._answers = answers
        self._device = device
        self._reply_prefixes = reply_prefixes or config.reply_prefixes
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
            self._stream(self._error_topic(error, message), request_id, message), error
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
            stream = self._stream(self._error_topic(exc, message), exc.request_id, message)
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
        response_topic = message.response_topic
        error_id = request.id if request.id_chosen else None
        # docs/protocol.md "Where errors go": the sender knows only an id it chose.
        fallback = self._topics.answer(request.id) if request.id_chosen else self._topics.error
        if response_topic is not None and not is_allowed_reply_topic(
            response_topic, self._reply_prefixes
        ):
            error = RequestError(
                ErrorCode.FORBIDDEN_REPLY_TOPIC,
                reply_topic_problem(response_topic, self._reply_prefixes),
                error_id,
            )
            self._log.log(
                logging.WARNING,
                "forbidden",
                "request %s asked for forbidden reply topic %r",
                request.id,
                response_topic,
                extra={"request_id": request.id, "code": str(error.code)},
            )
            self._scheduler.reject(self._stream(fallback, error_id, message), error)
            return None
        topic = response_topic or self._topics.answer(request.id)
        problem = self._no_room(topic, message.correlation_data, request)
        if problem is None:
            return topic
        # Answer on a topic and with correlation data that fit, so that the error can be sent.
        error = RequestError(ErrorCode.TOO_LARGE, problem, error_id)
        # An id-less sender cannot know P/answer/{generated id}: P/error, unless it named a topic.
        knows_topic = request.id_chosen or response_topic is not None
        error_topic = (
            topic if knows_topic and self._no_room(topic, None, request) is None else fallback
        )
        keep_correlation = self._no_room(error_topic, message.correlation_data, request) is None
        log.warning(
            "request %s refused: %s%s",
            request.id,
            problem,
            "" if keep_correlation else "; its error goes without the correlation data",
            extra={"request_id": request.id, "code": str(error.code)},
        )
        stream = self._stream(
            error_topic,
            error_id,
            message,
            correlation_data=keep_correlation,
            max_message_bytes=request.max_message_bytes,
        )
        self._scheduler.reject(stream, error)
        return None

    def _no_room(self, topic: str, correlation_data: bytes | None, request: Request) -> str | None:
        """Why replies on `topic` with this correlation data cannot fit the limits."""
        broker_limit = self._connection.max_packet_bytes
        if (
            broker_limit is not None
            and self._outlet.packet_bytes(topic, _MIN_REPLY_PAYLOAD_BYTES, correlation_data)
            > broker_limit
        ):
            limit, whose = broker_limit, "the broker's maximum packet size"
        elif request.max_message_bytes is not None and (
            self._outlet.packet_bytes(topic, _smallest_done_bytes(request), correlation_data)
            > request.max_message_bytes
        ):
            limit, whose = request.max_message_bytes, "max_message_bytes"
        else:
            return None
        return (
            f"the reply topic ({len(topic.encode('utf-8'))} bytes) and correlation data "
            f"({len(correlation_data or b'')} bytes) leave no room for an answer within "
            f"{whose} of {limit} bytes; shorten them"
        )

    def _error_topic(self, error: RequestError, message: Inbound) -> str:
        """Where an invalid request's error goes (docs/protocol.md, "Where errors go")."""
        response_topic = message.response_topic
        if error.code is ErrorCode.TOO_LARGE:
            return self._topics.error  # docs/protocol.md: rejected unread, answered on P/error
        if response_topic is not None and is_allowed_reply_topic(
            response_topic, self._reply_prefixes
        ):
            return response_topic
        if error.request_id is not None:
            return self._topics.answer(error.request_id)
        return self._topics.error

    # --- ids seen before --------------------------------------------------------------------

    def _refuse_duplicate(
        self, request: Request, message: Inbound, acknowledge: Callable[[], None]
    ) -> None:
        """A second request under a running or queued id: refused apart from its stream."""
        if message.dup:
            acknowledge()  # the broker's copy of a question we hold under another packet id
            return
        response_topic = message.response_topic
        topic = (
            response_topic
            if response_topic is not None
            and is_allowed_reply_topic(response_topic, self._reply_prefixes)
            else self._topics.error
        )
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
        delivery = self._connection.publish(
            topic,
            payload,
            correlation_data=message.correlation_data,
            content_type=JSON,
            on_delivered=acknowledge,
        )
        if delivery.refused:
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


def _smallest_done_bytes(request: Request) -> int:
    """The payload of a done with everything left out that may be (docs/protocol.md, "Tiny
    devices"), with room for a restart flag, a long seq and one more character. A turn's
    conversation block stays in, with room for long counts."""
    conversation = None
    if request.conversation_id is not None:
        conversation = ConversationInfo(request.conversation_id, 99999, 999999, 99999, new=False)
    smallest = Done(
        "", "cancelled", Usage(0, 0), Timing(0.0, None, 0.0, None), conversation=conversation
    ).smaller()[-1]
    return len(smallest.to_payload(request.id, 99999, restart=True)) + 4


def _question_digest(request: Request) -> bytes:
    return digest(request.question.encode("utf-8"))
