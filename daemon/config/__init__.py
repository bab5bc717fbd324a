"""Typed configuration: YAML file -> nested dict -> one frozen dataclass per section.

The package keeps the key declarations apart from loading and checking them:
- keys: `_key(default, doc, check)` and the value checks that several sections share;
- mqtt, model, questions, device: the sections' keys, each with its default and one-line doc;
- schema: `Config`, the whole configuration, the values derived from it, and `describe`;
- loader: YAML with each key's line, type and value checks, unknown keys (`load`, `from_dict`);
- rules: errors that tie two keys together, and warnings (`config_warnings`);
- errors: `ConfigError`; listen: HOST:PORT and loopback; host: defaults from the machine;
  credentials: the MQTT password from a file.
The rest of kioskd imports from `daemon.config` only, never from a module of the package.
"""

from daemon.config.device import (
    HomeAssistantConfig,
    LoggingConfig,
    TelemetryConfig,
    ThermalConfig,
    WatchdogConfig,
    WebConfig,
)
from daemon.config.errors import ConfigError
from daemon.config.host import data_dir, default_threads, sanitize_device_id
from daemon.config.listen import is_loopback, parse_listen, remote_listen_problem
from daemon.config.loader import from_dict, load
from daemon.config.model import DEFAULT_EXAMPLES, ModelConfig
from daemon.config.mqtt import FleetConfig, MqttConfig, TlsConfig
from daemon.config.questions import (
    ConversationsConfig,
    LimitsConfig,
    QueueConfig,
    ShutdownConfig,
    StreamConfig,
)
from daemon.config.rules import config_warnings
from daemon.config.schema import Config, describe

__all__ = [
    "DEFAULT_EXAMPLES",
    "Config",
    "ConfigError",
    "ConversationsConfig",
    "FleetConfig",
    "HomeAssistantConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "QueueConfig",
    "ShutdownConfig",
    "StreamConfig",
    "TelemetryConfig",
    "ThermalConfig",
    "TlsConfig",
    "WatchdogConfig",
    "WebConfig",
    "config_warnings",
    "data_dir",
    "default_threads",
    "describe",
    "from_dict",
    "is_loopback",
    "load",
    "parse_listen",
    "remote_listen_problem",
    "sanitize_device_id",
]
