"""The broker's keys: connection, TLS, topics, and the fleet's shared subscription."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field

from daemon.config.errors import ConfigError
from daemon.config.keys import _at_least, _between, _key, _one_of, _positive, _topic_prefix


def _device_id(value: str | None) -> str | None:
    if value is None or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        return None
    return "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' (it becomes a topic level)"


def _reply_prefixes(value: list[str] | None) -> str | None:
    if value is None:
        return None
    for prefix in value:
        if not isinstance(prefix, str) or not prefix or prefix.startswith("$"):
            return "each prefix must be a non-empty string not starting with '$'"
        if any(c in prefix for c in "+#\0"):
            return "prefixes must not contain MQTT wildcards (+, #)"
    return None


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker; certificates are verified and never skipped."""

    enabled: bool = _key(False, "connect with TLS (also on when any file below is set)")
    ca_file: str | None = _key(None, "CA certificate(s) for the broker; null = the system's CAs")
    cert_file: str | None = _key(None, "client certificate, for brokers that require one")
    key_file: str | None = _key(None, "private key of the client certificate")

    @property
    def active(self) -> bool:
        return self.enabled or any((self.ca_file, self.cert_file, self.key_file))

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying client TLS context from these files, or None for plain TCP."""
        if not self.active:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"mqtt.tls: cannot load the certificates: {exc}"]) from exc
        return context


@dataclass(frozen=True)
class MqttConfig:
    """How kioskd reaches the broker and which topics it owns."""

    host: str = _key("127.0.0.1", "broker host name or address")
    port: int = _key(1883, "broker TCP port", _between(1, 65535))
    protocol: str = _key("5", "MQTT protocol version: '5' or '3.1.1'", _one_of("5", "3.1.1"))
    device_id: str | None = _key(
        None,
        "this kiosk's name in topics; null = the host name, lower-cased and sanitised",
        _device_id,
    )
    topic_prefix: str = _key(
        "kiosk/{device_id}", "prefix P of every topic; {device_id} is substituted", _topic_prefix
    )
    client_id: str | None = _key(
        None, "MQTT client id; must be stable for the persistent session; null = kioskd-{device_id}"
    )
    keepalive_s: int = _key(30, "MQTT keepalive interval", _between(5, 65535))
    session_expiry_s: int = _key(
        86400,
        "MQTT 5 session expiry: how long the broker keeps questions while we are away",
        _at_least(1),
    )
    reply_prefixes: list[str] | None = _key(
        None, "allowed MQTT 5 Response Topic prefixes; null = [P/answer/]", _reply_prefixes
    )
    username: str | None = _key(None, "MQTT user name; null = connect anonymously")
    password_file: str | None = _key(
        None, "file holding the MQTT password; null = $CREDENTIALS_DIRECTORY/mqtt-password if set"
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    max_message_bytes: int | None = _key(
        None,
        "largest message the broker accepts (mosquitto message_size_limit); null = learn it from "
        "MQTT 5 CONNACK, else no limit",
        _at_least(512),
    )
    reconnect_min_s: float = _key(1.0, "first reconnect delay after losing the broker", _positive)
    reconnect_max_s: float = _key(30.0, "longest reconnect delay (doubling backoff)", _positive)
    broker_inflight_limit: int = _key(
        20,
        "questions the broker sends before waiting for our PUBACKs (mosquitto "
        "max_inflight_messages); kioskd holds one per running or queued question",
        _at_least(1),
    )


def _fleet_prefix(value: str | None) -> str | None:
    return None if value is None else _topic_prefix(value)


def _share_group(value: str) -> str | None:
    if not value or any(c in value for c in "/+#\0"):
        return "must be a non-empty name without '/', '+', '#' (it is one topic level)"
    return None


@dataclass(frozen=True)
class FleetConfig:
    """Kiosks that share one pool of questions (MQTT 5 shared subscription; README, "Fleet")."""

    prefix: str | None = _key(
        None,
        "fleet prefix F: also answer questions from $share/{group}/F/ask; null = no fleet",
        _fleet_prefix,
    )
    group: str = _key(
        "kioskd",
        "shared subscription group: the broker hands each question to one member",
        _share_group,
    )
