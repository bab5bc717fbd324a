"""The whole configuration: one section per YAML mapping, the values derived from them, `describe`.

Every key is declared once, with its default and a one-line doc (the field's `doc` metadata), in
the section modules: mqtt (broker, TLS, fleet), model, questions (queue, limits, conversations,
stream, shutdown) and device (telemetry, thermal, Home Assistant, watchdog, web, logging).
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from daemon.config.credentials import read_mqtt_password
from daemon.config.device import (
    HomeAssistantConfig,
    LoggingConfig,
    TelemetryConfig,
    ThermalConfig,
    WatchdogConfig,
    WebConfig,
)
from daemon.config.host import default_threads, sanitize_device_id
from daemon.config.model import ModelConfig
from daemon.config.mqtt import FleetConfig, MqttConfig
from daemon.config.questions import (
    ConversationsConfig,
    LimitsConfig,
    QueueConfig,
    ShutdownConfig,
    StreamConfig,
)


@dataclass(frozen=True)
class Config:
    """The whole configuration; one attribute per YAML section."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    thermal: ThermalConfig = field(default_factory=ThermalConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    web: WebConfig = field(default_factory=WebConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def device_id(self) -> str:
        return self.mqtt.device_id or sanitize_device_id(socket.gethostname())

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix.replace("{device_id}", self.device_id)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"kioskd-{self.device_id}"

    @property
    def reply_prefixes(self) -> tuple[str, ...]:
        if self.mqtt.reply_prefixes is None:
            return (f"{self.topic_prefix}/answer/",)
        return tuple(p.replace("{device_id}", self.device_id) for p in self.mqtt.reply_prefixes)

    def mqtt_password(self) -> str | None:
        """The MQTT password from its file or systemd credential; never logged or printed."""
        return read_mqtt_password(self.mqtt.password_file)

    @property
    def threads(self) -> int:
        return self.model.threads or default_threads()

    @property
    def threads_batch(self) -> int:
        return self.model.threads_batch or self.threads


def describe() -> list[tuple[str, Any, str]]:
    """Every key as (path, default, doc), for docs and for checking the shipped YAML."""
    rows: list[tuple[str, Any, str]] = []

    def walk(cls: Any, prefix: str) -> None:
        types = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(types[f.name]):
                walk(types[f.name], f"{prefix}{f.name}.")
                continue
            default = (
                f.default_factory()  # type: ignore[operator]
                if f.default is dataclasses.MISSING
                else f.default
            )
            rows.append((f"{prefix}{f.name}", default, f.metadata["doc"]))

    walk(Config, "")
    return rows
