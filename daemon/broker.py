"""The MQTT connection: the only module that imports paho.

paho's own loop thread (loop_start) owns the socket; every publish in kioskd goes through
`Connection.publish`, which only queues the packet for that thread. Every callback catches and
logs its own exceptions, because with paho 2.x an exception escaping a callback stops all traffic.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.brokeracks import Acknowledgements, Delivery, Subscriptions
from daemon.brokerproblems import ConnectionProblems
from daemon.packets import Inbound, PacketLimit, Will, publish_packet_bytes

log = logging.getLogger(__name__)

# Outgoing messages paho may hold while disconnected: a few long answers' worth of chunks.
_MAX_QUEUED_MESSAGES = 20000


def _publish_properties(
    correlation_data: bytes | None, content_type: str | None
) -> Properties | None:
    if correlation_data is None and content_type is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        # Every content type kioskd sends is text: tell generic clients it is UTF-8.
        properties.ContentType = content_type
        properties.PayloadFormatIndicator = 1
    if correlation_data is not None:
        properties.CorrelationData = correlation_data
    return properties


class Connection:
    """One MQTT client session, reconnecting on its own with backoff."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        protocol: str = "5",
        keepalive_s: int = 30,
        session_expiry_s: int | None = None,
        will: Will | None = None,
        subscriptions: Iterable[str] = (),
        on_message: Callable[[Inbound], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_problem: Callable[[str | None], None] | None = None,
        manual_ack: bool = False,
        max_packet_bytes: int | None = None,
    ) -> None:
        """`session_expiry_s=None` asks for a clean, throw-away session; else a persistent one.

        With `manual_ack`, a received QoS 1 message is acknowledged only by `acknowledge()`: until
        then the broker keeps it in our session and sends it again after a reconnect.
        """
        self._host = host
        self._port = port
        self._keepalive_s = keepalive_s
        self._mqtt5 = protocol == "5"
        self._persistent = session_expiry_s is not None
        self._session_expiry_s = session_expiry_s or 0
        self._subscriptions = Subscriptions(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._connected = threading.Event()
        self._problems = ConnectionProblems(
            host=host,
            port=port,
            client_id=client_id,
            tls_context=tls_context,
            on_problem=on_problem,
        )
        self._limit = PacketLimit(max_packet_bytes, mqtt5=self._mqtt5)
        self._acks = Acknowledgements()
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._mqtt5 else not self._persistent,
            manual_ack=manual_ack,
        )
        # Bounds what piles up while the broker is away (QoS 1 keeps the rest for the reconnect).
        self._client.max_queued_messages_set(_MAX_QUEUED_MESSAGES)
        self._client.reconnect_delay_set(
            min_delay=max(1, round(reconnect_min_s)), max_delay=max(1, round(reconnect_max_s))
        )
        if tls_context is not None:
            # The context verifies the broker's certificate and host name; there is no opt-out.
            self._client.tls_set_context(tls_context)
        if username is not None:
            self._client.username_pw_set(username, password)
            if password is not None and tls_context is None:
                log.warning("the MQTT password is sent unencrypted; set mqtt.tls for this broker")
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._client.on_socket_open = self._handle_socket_open
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_unsubscribe = self._handle_unsubscribe
        self._client.on_publish = self._handle_publish
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def problem(self) -> str | None:
        """What keeps the connection from working, in words for the operator; None: nothing."""
        return self._problems.problem

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried until it is up."""
        properties = None
        if self._mqtt5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry_s
        self._client.connect_async(
            self._host,
            self._port,
            keepalive=self._keepalive_s,
            clean_start=not self._persistent if self._mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def max_packet_bytes(self) -> int | None:
        """The largest packet we may send: the configured limit or the broker's, if smaller."""
        return self._limit.max_bytes

    def packet_bytes(
        self,
        topic: str,
        payload_bytes: int,
        *,
        qos: int = 1,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> int:
        """The PUBLISH packet's size on this connection (MQTT 3.1.1 drops the properties)."""
        return publish_packet_bytes(
            topic,
            payload_bytes,
            qos=qos,
            correlation_data=correlation_data,
            content_type=content_type,
            mqtt5=self._mqtt5,
        )

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> Delivery:
        """Queue a message for the network thread; QoS 1 ones survive a reconnect.

        Every publish of kioskd passes here, so this is where the broker's Maximum Packet Size
        is enforced: a bigger packet would make the broker drop the connection, and paho would
        send it again after every reconnect. `on_delivered` runs on the network thread once the
        broker has acknowledged a QoS 1 message.
        """
        if self._limit.refuses(
            topic,
            len(payload),
            qos=qos,
            correlation_data=correlation_data,
            content_type=content_type,
        ):
            return Delivery(None)
        properties = _publish_properties(correlation_data, content_type) if self._mqtt5 else None
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
        except (ValueError, OSError):
            log.exception("publish to %s failed", topic)
            return Delivery(None)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("publish to %s refused: %s", topic, paho.error_string(info.rc))
            return Delivery(None)
        if qos > 0:
            self._acks.register_delivery(info.mid, on_delivered)
        return Delivery(info)

    def acknowledge(self, message: Inbound) -> None:
        """Send the PUBACK of a QoS 1 message received with manual_ack; from any thread."""
        if message.qos == 0:
            return
        rc = self._client.ack(message.mid, message.qos)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("could not acknowledge message %d: %s", message.mid, paho.error_string(rc))

    def subscribe(self, topic: str) -> int | None:
        """Subscribe now and after every reconnect (a client's answer topic, before it asks).

        A PUBLISH queued after this call reaches the broker after the SUBSCRIBE, so the replies
        to it are routed to us.
        """
        if not self._subscriptions.add(topic):
            return None
        # While disconnected paho refuses this; the next connect subscribes to the whole list.
        _rc, mid = self._client.subscribe(topic, 1)
        self._subscriptions.sent(mid, [topic])
        return mid

    def unsubscribe(self, topic: str) -> int | None:
        """Drop a subscription made with `subscribe` (or given at construction)."""
        if not self._subscriptions.remove(topic):
            return None
        _rc, mid = self._client.unsubscribe(topic)
        return mid

    def wait_acknowledged(self, mid: int | None, timeout_s: float) -> bool:
        """Wait for the SUBACK or UNSUBACK of the request `mid` (None: nothing was sent)."""
        if mid is None:
            return False
        return self._acks.wait_acknowledged(mid, timeout_s)

    @property
    def subscribed(self) -> bool:
        """Whether the broker has acknowledged every subscription asked for so far."""
        return self._subscriptions.all_acknowledged

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # --- paho callbacks, on the network thread --------------------------------------------

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            # Nagle's algorithm would hold each small chunk back for about 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception:
            log.exception("could not set TCP_NODELAY")

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self._problems.refused(reason_code)
                return
            packet_limit = getattr(properties, "MaximumPacketSize", None) if properties else None
            self._limit.broker_bytes = int(packet_limit) if packet_limit else None
            log.info(
                "connected to broker %s:%s (session present: %s)",
                self._host,
                self._port,
                flags.session_present,
            )
            if topics := self._subscriptions.topics:
                # Resubscribe every time: a broker that lost our session has lost them too.
                _rc, mid = client.subscribe([(topic, 1) for topic in topics])
                self._subscriptions.sent(mid, topics)
            self._connected.set()
            self._problems.connected()
            if self._on_connected is not None:
                self._on_connected()
        except Exception:
            log.exception("error in connect handler")

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._problems.disconnected(reason_code, was_connected=was_connected)
        except Exception:
            log.exception("error in disconnect handler")

    def _handle_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            topics = self._subscriptions.acknowledged(mid)
            for topic, code in zip(topics, reason_codes, strict=False):
                if code.is_failure:
                    self._problems.subscription_refused(topic, code)
            self._acks.note_acknowledged(mid)
        except Exception:
            log.exception("error in subscribe handler")

    def _handle_unsubscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode] | ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._acks.note_acknowledged(mid)
        except Exception:
            log.exception("error in unsubscribe handler")

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                # MQTT 5 brokers say so in the PUBACK when an ACL forbids the topic.
                log.error(
                    "broker refused a publish (mid %d): %s (check the broker's ACL)",
                    mid,
                    reason_code,
                )
            self._acks.note_delivered(mid)
        except Exception:
            log.exception("error in publish handler")

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        try:
            self._problems.connect_failed()
        except Exception:
            log.exception("error in connect-fail handler")

    def _handle_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        try:
            properties = getattr(message, "properties", None)
            response_topic = getattr(properties, "ResponseTopic", None) if properties else None
            correlation_data = getattr(properties, "CorrelationData", None) if properties else None
            user_properties = getattr(properties, "UserProperty", None) if properties else None
            inbound = Inbound(
                message.topic,
                bytes(message.payload),
                response_topic,
                correlation_data,
                tuple(user_properties or ()),
                bool(message.retain),
                int(message.qos),
                int(message.mid),
                bool(message.dup),
            )
            if self._on_message is not None:
                self._on_message(inbound)
        except Exception:
            log.exception("error handling a message on %s", getattr(message, "topic", "?"))
