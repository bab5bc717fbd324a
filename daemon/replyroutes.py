"""Where a question's replies and errors go (docs/protocol.md, "Where errors go").

A reply topic must be allowed, and it and the correlation data must leave room for an answer
within the broker's packet limit and the requester's max_message_bytes; otherwise the request
is refused, on a topic and with correlation data that let the refusal itself be sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.messages import (
    ConversationInfo,
    Done,
    ErrorCode,
    Request,
    RequestError,
    Timing,
    Usage,
)
from daemon.outlet import Outlet
from daemon.packets import Inbound
from daemon.topics import Topics, is_allowed_reply_topic, reply_topic_problem

# Room a reply needs besides its topic and correlation data: a done with a short text, usage and
# timing. A request whose reply topic and correlation data leave less is refused at intake.
_MIN_REPLY_PAYLOAD_BYTES = 256


@dataclass(frozen=True)
class Refusal:
    """A request refused for its reply topic, and how its error is to be sent."""

    error: RequestError
    topic: str
    correlation_data: bool = True  # False: the error goes without the correlation data
    max_message_bytes: int | None = None


class ReplyRoutes:
    """Picks the topic of each reply, refusal and error of one ask topic's requests."""

    def __init__(self, topics: Topics, reply_prefixes: tuple[str, ...], outlet: Outlet) -> None:
        self._topics = topics
        self._reply_prefixes = reply_prefixes
        self._outlet = outlet

    def reply_topic(self, request: Request, message: Inbound) -> str | Refusal:
        """The topic of an accepted request's stream, or why and where it is refused."""
        response_topic = message.response_topic
        error_id = request.id if request.id_chosen else None
        # docs/protocol.md "Where errors go": the sender knows only an id it chose.
        fallback = self._topics.answer(request.id) if request.id_chosen else self._topics.error
        if response_topic is not None and not self.allowed(response_topic):
            forbidden = reply_topic_problem(response_topic, self._reply_prefixes)
            error = RequestError(ErrorCode.FORBIDDEN_REPLY_TOPIC, forbidden, error_id)
            return Refusal(error, fallback)
        topic = response_topic or self._topics.answer(request.id)
        problem = self._no_room(topic, message.correlation_data, request)
        if problem is None:
            return topic
        # Answer on a topic and with correlation data that fit, so that the error can be sent.
        # An id-less sender cannot know P/answer/{generated id}: P/error, unless it named a topic.
        knows_topic = request.id_chosen or response_topic is not None
        error_topic = (
            topic if knows_topic and self._no_room(topic, None, request) is None else fallback
        )
        return Refusal(
            RequestError(ErrorCode.TOO_LARGE, problem, error_id),
            error_topic,
            correlation_data=self._no_room(error_topic, message.correlation_data, request) is None,
            max_message_bytes=request.max_message_bytes,
        )

    def error_topic(self, error: RequestError, message: Inbound) -> str:
        """Where an invalid request's error goes."""
        response_topic = message.response_topic
        if error.code is ErrorCode.TOO_LARGE:
            return self._topics.error  # docs/protocol.md: rejected unread, answered on P/error
        if response_topic is not None and self.allowed(response_topic):
            return response_topic
        if error.request_id is not None:
            return self._topics.answer(error.request_id)
        return self._topics.error

    def duplicate_topic(self, message: Inbound) -> str:
        """Where the refusal of a running or queued id goes: apart from that id's stream."""
        response_topic = message.response_topic
        if response_topic is not None and self.allowed(response_topic):
            return response_topic
        return self._topics.error

    def allowed(self, topic: str) -> bool:
        return is_allowed_reply_topic(topic, self._reply_prefixes)

    def _no_room(self, topic: str, correlation_data: bytes | None, request: Request) -> str | None:
        """Why replies on `topic` with this correlation data cannot fit the limits."""
        broker_limit = self._outlet.max_packet_bytes()
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
