"""The last word of a kiosk that cannot come up: why, on P/error, before the process exits."""

from __future__ import annotations

from pathlib import Path

import yaml

from daemon.broker import Connection
from daemon.config import ConfigError, from_dict
from daemon.messages import Error, ErrorCode
from daemon.topics import Topics

# How long a last message waits for the broker's acknowledgement (shutdown waits as long).
FLUSH_TIMEOUT_S = 2.0


def report_fatal(
    connection: Connection, topics: Topics, device: str, code: ErrorCode, message: str
) -> None:
    """Tell clients why we are not coming up, when the broker is reachable."""
    if connection.wait_connected(FLUSH_TIMEOUT_S):
        payload = Error(code, message).to_payload(None, 0, device=device)
        connection.publish(topics.error, payload).wait(FLUSH_TIMEOUT_S)


def report_config_error(config_path: Path, problems: list[str]) -> None:
    """Tell clients why this kiosk is not coming up, if the file's mqtt section is usable.

    Connects under a separate client id, so the daemon's persistent session (and the questions
    queued in it) is left alone.
    """
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        mqtt = raw.get("mqtt") if isinstance(raw, dict) else None
        config = from_dict({"mqtt": mqtt or {}})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return  # without a valid broker address there is no one to tell
    topics = Topics(config.topic_prefix)
    try:
        connection = Connection(
            host=config.mqtt.host,
            port=config.mqtt.port,
            client_id=f"{config.client_id}-config-error",
            protocol=config.mqtt.protocol,
            username=config.mqtt.username,
            password=config.mqtt_password(),
            tls_context=config.mqtt.tls.ssl_context(),
        )
    except ConfigError:
        return
    connection.start()
    try:
        if not connection.wait_connected(FLUSH_TIMEOUT_S):
            return
        message = "kioskd cannot start: invalid configuration: " + "; ".join(problems)
        payload = Error(ErrorCode.INTERNAL, message).to_payload(None, 0, device=config.device_id)
        connection.publish(topics.error, payload).wait(FLUSH_TIMEOUT_S)
        connection.publish(topics.status, b"offline", retain=True).wait(FLUSH_TIMEOUT_S)
    finally:
        connection.stop()
