"""P/cancel and P/forget: a question cancelled, a conversation forgotten, each by its id."""

from __future__ import annotations

import logging
from collections.abc import Callable

from daemon.loglimit import LogLimiter
from daemon.packets import Inbound
from daemon.topics import Topics
from daemon.validation import parse_cancel, parse_forget

log = logging.getLogger(__name__)


class Controls:
    """Acts on the kiosk's own P/cancel and P/forget messages (network thread)."""

    def __init__(
        self,
        topics: Topics,
        *,
        cancel: Callable[[str], bool],
        forget: Callable[[str], bool],
    ) -> None:
        """`cancel` and `forget` take an id and say whether it was known."""
        self._topics = topics
        self._cancel = cancel
        self._forget = forget
        self._log = LogLimiter(log)

    def dispatch(self, message: Inbound) -> None:
        """Act on a message of P/cancel or P/forget; other topics are left alone."""
        if message.topic in (self._topics.cancel, self._topics.forget) and message.retain:
            # A retained cancel or forget would act again at every (re)subscribe.
            log.warning(
                "ignored a retained message on %s; clear it with an empty retained publish",
                message.topic,
            )
        elif message.topic == self._topics.cancel:
            self._on_cancel(message)
        elif message.topic == self._topics.forget:
            self._on_forget(message)

    def _on_cancel(self, message: Inbound) -> None:
        request_id = parse_cancel(message.payload)
        if request_id is None:
            self._log.log(logging.WARNING, "bad_cancel", "ignored a cancel without a valid id")
        elif not self._cancel(request_id):
            self._log.log(
                logging.INFO,
                "unknown_cancel",
                "cancel for unknown request %s ignored",
                request_id,
                extra={"request_id": request_id},
            )

    def _on_forget(self, message: Inbound) -> None:
        conversation_id = parse_forget(message.payload)
        if conversation_id is None:
            self._log.log(
                logging.WARNING, "bad_forget", "ignored a forget without a valid conversation_id"
            )
        elif self._forget(conversation_id):
            log.info("conversation %s forgotten", conversation_id)
        else:
            self._log.log(
                logging.INFO,
                "unknown_forget",
                "forget for unknown conversation %s ignored",
                conversation_id,
            )
