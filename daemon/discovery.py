"""Home Assistant MQTT discovery: config payloads that turn P/health into HA entities.

Pure functions; the caller publishes each (topic, payload) retained, as JSON, after connecting,
so Home Assistant finds the kiosk again after its own restart. Every entity reads the retained
P/health JSON; a JSON null renders as the text "None", which HA shows as "unknown".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from daemon.topics import homeassistant_config

# P/health.state values, from docs/protocol.md.
HEALTH_STATES = ("starting", "loading", "ready", "busy", "throttled", "draining")

# HA expires a reading it has not seen refreshed for this many telemetry intervals, so a kiosk
# that stops publishing shows "unavailable" even if its last will never arrives.
_EXPIRE_AFTER_INTERVALS = 3

_NODE_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")

# A null must not read as "off": HA maps the rendered text "None" to unknown.
_THROTTLED_TEMPLATE = (
    "{% if value_json.thermal.throttled.now is none %}None"
    "{% elif value_json.thermal.throttled.now %}ON"
    "{% else %}OFF{% endif %}"
)


@dataclass(frozen=True, slots=True)
class _Entity:
    component: str
    object_id: str
    name: str
    value_template: str
    extra: tuple[tuple[str, object], ...] = ()


_ENTITIES: tuple[_Entity, ...] = (
    _Entity(
        "sensor",
        "cpu_temp",
        "CPU temperature",
        "{{ value_json.thermal.cpu_c }}",
        (
            ("device_class", "temperature"),
            ("state_class", "measurement"),
            ("unit_of_measurement", "°C"),
            ("suggested_display_precision", 1),
            ("entity_category", "diagnostic"),
        ),
    ),
    _Entity(
        "sensor",
        "cpu_percent",
        "CPU usage",
        "{{ value_json.cpu.percent }}",
        (
            ("state_class", "measurement"),
            ("unit_of_measurement", "%"),
            ("icon", "mdi:cpu-64-bit"),
            ("entity_category", "diagnostic"),
        ),
    ),
    _Entity(
        "sensor",
        "memory_available",
        "Memory available",
        "{{ value_json.memory.available_mb }}",
        (
            ("device_class", "data_size"),
            ("state_class", "measurement"),
            # The protocol's _mb fields are binary megabytes (MiB), as the kernel counts them.
            ("unit_of_measurement", "MiB"),
            ("entity_category", "diagnostic"),
        ),
    ),
    _Entity(
        "sensor",
        "rss",
        "Process memory",
        "{{ value_json.memory.rss_mb }}",
        (
            ("device_class", "data_size"),
            ("state_class", "measurement"),
            ("unit_of_measurement", "MiB"),
            ("entity_category", "diagnostic"),
        ),
    ),
    _Entity(
        "sensor",
        "queue_depth",
        "Queue depth",
        "{{ value_json.queue.depth }}",
        (("state_class", "measurement"), ("icon", "mdi:tray-full")),
    ),
    _Entity(
        "sensor",
        "conversations",
        "Conversations",
        "{{ value_json.conversations.active }}",
        (("state_class", "measurement"), ("icon", "mdi:forum")),
    ),
    _Entity(
        "sensor",
        "state",
        "State",
        "{{ value_json.state }}",
        (("device_class", "enum"), ("options", HEALTH_STATES)),
    ),
    _Entity(
        "sensor",
        "tokens_per_s",
        "Last tokens per second",
        "{{ value_json.last.tokens_per_s }}",
        (
            ("state_class", "measurement"),
            ("unit_of_measurement", "tokens/s"),
            ("suggested_display_precision", 1),
            ("icon", "mdi:speedometer"),
        ),
    ),
    _Entity(
        "binary_sensor",
        "throttled",
        "Throttled",
        _THROTTLED_TEMPLATE,
        (
            # "problem": the firmware flag also covers under-voltage, not only heat.
            ("device_class", "problem"),
            ("payload_on", "ON"),
            ("payload_off", "OFF"),
            ("entity_category", "diagnostic"),
        ),
    ),
)


def node_id_for(device_id: str) -> str:
    """The discovery node id for a device: HA allows only [a-zA-Z0-9_-] in it."""
    return _NODE_ID_UNSAFE.sub("_", device_id) or "kiosk"


def expire_after_s(interval_s: float) -> int:
    """Seconds after which HA marks a reading stale: three missed telemetry intervals."""
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    return max(1, math.ceil(_EXPIRE_AFTER_INTERVALS * interval_s))


def discovery_messages(
    *,
    device_id: str,
    ha_prefix: str,
    health_topic: str,
    status_topic: str,
    interval_s: float,
    model_name: str,
    sw_version: str,
) -> list[tuple[str, dict[str, object]]]:
    """Discovery (topic, config payload) pairs for one kiosk: one HA device, one entity per field.

    ``model_name`` is shown as the device's model in HA.
    """
    node_id = node_id_for(device_id)
    device: dict[str, object] = {
        "identifiers": [f"kioskd_{node_id}"],
        "name": device_id,
        "manufacturer": "kioskd",
        "model": model_name,
        "sw_version": sw_version,
    }
    expire_after = expire_after_s(interval_s)
    messages: list[tuple[str, dict[str, object]]] = []
    for entity in _ENTITIES:
        payload: dict[str, object] = {
            "name": entity.name,
            "unique_id": f"kioskd_{node_id}_{entity.object_id}",
            "state_topic": health_topic,
            "value_template": entity.value_template,
            "availability_topic": status_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "expire_after": expire_after,
            # Copies, so that a caller editing one payload cannot change the others.
            "device": dict(device),
        }
        payload.update(
            (key, list(value) if isinstance(value, tuple) else value) for key, value in entity.extra
        )
        messages.append((_config_topic(ha_prefix, entity, node_id), payload))
    return messages


def _config_topic(ha_prefix: str, entity: _Entity, node_id: str) -> str:
    return homeassistant_config(ha_prefix, entity.component, node_id, entity.object_id)
