"""Membership of a fleet: questions from one pool, shared by the broker (docs/protocol.md, "Fleet").

The fleet has its own MQTT connection, with clean start and no session expiry, apart from the
kiosk's own persistent one:
- mosquitto keeps an offline persistent member's turn in the share and hoards its messages
  (mosquitto#1747): a session that ends with the connection leaves the group at once, so a
  crashed or stopped kiosk never holds the pool's questions;
- questions to the kiosk's own P/ask keep their persistent session and crash safety.
The price: a fleet question in flight when a kiosk dies is lost on mosquitto (mosquitto#2662),
so fleet clients time out and ask again with the same id (docs/protocol.md, "Fleet").

The kiosk leaves the share (UNSUBSCRIBE) while it is overheated or draining, so that later
questions go to the others, and joins again when it can take questions. A full queue stays in
and answers `busy`: leaving would only move the queue to the broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from daemon.broker import Connection
from daemon.config import Config
from daemon.intake import Intake
from daemon.ledger import PacketLedger, RecentAnswers
from daemon.loglimit import LogLimiter
from daemon.packets import Inbound
from daemon.scheduler import Scheduler
from daemon.topics import Topics
from daemon.validation import parse_cancel, parse_forget

log = logging.getLogger(__name__)

# How long joining or leaving waits for the broker's SUBACK / UNSUBACK.
_ACK_WAIT_S = 5.0


class FleetMember:
    """The fleet connection, its intake, and whether this kiosk is in the share now."""

    def __init__(
        self,
        config: Config,
        scheduler: Scheduler,
        answers: RecentAnswers,
        make_connection: Callable[..., Connection],
        forget: Callable[[str], bool] = lambda _conversation_id: False,
    ) -> None:
        """`forget` drops a conversation (for F/forget); True when it was known."""
        prefix = config.fleet.prefix
        if prefix is None:
            raise ValueError("FleetMember needs fleet.prefix")
        self.topics = Topics(prefix)
        self.group = config.fleet.group
        self._share = self.topics.shared_ask(self.group)
        self._scheduler = scheduler
        self._forget = forget
        self._log = LogLimiter(log)
        self._lock = threading.Lock()
        self._wanted = False  # whether we should be in the share (set by join/leave)
        self.member = False
        self.packets = PacketLedger(max_ids=config.limits.dedup_max_ids)
        self.connection = make_connection(
            client_id=f"{config.client_id}-fleet",
            # Clean start, no session expiry: the session (and the share's turn) ends with us.
            session_expiry_s=None,
            subscriptions=[self.topics.cancel, self.topics.forget],
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        self.intake = Intake(
            config,
            self.topics,
            scheduler,
            self.connection,
            packets=self.packets,
            answers=answers,
            device=config.device_id,
            reply_prefixes=(*config.reply_prefixes, self.topics.answer_prefix),
        )

    def start(self) -> None:
        self.connection.start()

    def join(self) -> bool:
        """Enter the share; True once the broker has acknowledged it."""
        with self._lock:
            self._wanted = True
        mid = self.connection.subscribe(self._share)
        acknowledged = self.connection.wait_acknowledged(mid, _ACK_WAIT_S)
        with self._lock:
            self.member = self._wanted and (acknowledged or self.connection.subscribed)
        if self.member:
            log.info("joined the fleet %s as a member of group %s", self.topics.prefix, self.group)
        return self.member

    def leave(self, reason: str) -> None:
        """Leave the share so that later questions go to the other kiosks."""
        with self._lock:
            was_member, self._wanted, self.member = self.member, False, False
        mid = self.connection.unsubscribe(self._share)
        self.connection.wait_acknowledged(mid, _ACK_WAIT_S)
        if was_member:
            log.info("left the fleet %s (%s)", self.topics.prefix, reason)

    def stop(self) -> None:
        self.connection.stop()

    # --- network thread -------------------------------------------------------------------

    def _on_connected(self) -> None:
        # The connection resubscribes to what subscribe() recorded: the share too, if wanted.
        with self._lock:
            self.member = self._wanted

    def _on_message(self, message: Inbound) -> None:
        self.intake.dispatch(message, self._on_control)

    def _on_control(self, message: Inbound) -> None:
        if message.topic == self.topics.forget and not message.retain:
            conversation_id = parse_forget(message.payload)
            # Every member hears it; only the one that answered the conversation knows it.
            if conversation_id is not None and self._forget(conversation_id):
                log.info("fleet forget for conversation %s", conversation_id)
            return
        self._on_cancel(message)

    def _on_cancel(self, message: Inbound) -> None:
        if message.topic != self.topics.cancel or message.retain:
            return
        request_id = parse_cancel(message.payload)
        # Every member hears every fleet cancel: an unknown id is the normal case.
        if request_id is not None and self._scheduler.cancel(request_id):
            log.info("fleet cancel for %s", request_id, extra={"request_id": request_id})
