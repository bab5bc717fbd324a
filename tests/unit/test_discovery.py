"""Home Assistant discovery payloads against HA's documented MQTT options and the health JSON."""

from __future__ import annotations

import json
import re

import pytest

from daemon.discovery import (
    HEALTH_STATES,
    discovery_messages,
    expire_after_s,
    node_id_for,
)

# Configuration variables of the MQTT sensor, from
# https://www.home-assistant.io/integrations/sensor.mqtt/
# (home-assistant/home-assistant.io, source/_integrations/sensor.mqtt.markdown).
HA_SENSOR_OPTIONS = frozenset(
    {
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "device",
        "device_class",
        "enabled_by_default",
        "encoding",
        "entity_category",
        "entity_picture",
        "expire_after",
        "force_update",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "last_reset_value_template",
        "name",
        "object_id",
        "options",
        "payload_available",
        "payload_not_available",
        "platform",
        "suggested_display_precision",
        "qos",
        "state_class",
        "state_topic",
        "unique_id",
        "unit_of_measurement",
        "value_template",
    }
)

# Configuration variables of the MQTT binary sensor, from
# https://www.home-assistant.io/integrations/binary_sensor.mqtt/
# (home-assistant/home-assistant.io, source/_integrations/binary_sensor.mqtt.markdown).
HA_BINARY_SENSOR_OPTIONS = frozenset(
    {
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "device",
        "device_class",
        "enabled_by_default",
        "encoding",
        "entity_category",
        "entity_picture",
        "expire_after",
        "force_update",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "object_id",
        "off_delay",
        "payload_available",
        "payload_not_available",
        "payload_off",
        "payload_on",
        "platform",
        "qos",
        "state_topic",
        "unique_id",
        "value_template",
    }
)

# The `device` map, identical on both pages.
HA_DEVICE_OPTIONS = frozenset(
    {
        "configuration_url",
        "connections",
        "hw_version",
        "identifiers",
        "manufacturer",
        "model",
        "model_id",
        "name",
        "serial_number",
        "suggested_area",
        "sw_version",
        "via_device",
    }
)

# From https://www.home-assistant.io/integrations/sensor/#device-class
HA_DATA_SIZE_UNITS = frozenset(
    [
        "bit",
        "kbit",
        "Mbit",
        "Gbit",
        "B",
        "kB",
        "MB",
        "GB",
        "TB",
        "PB",
        "EB",
        "ZB",
        "YB",
        "KiB",
        "MiB",
        "GiB",
        "TiB",
        "PiB",
        "EiB",
        "ZiB",
        "YiB",
    ]
)

# docs/protocol.md's example P/health message, with the version 2 conversations section: every
# template must resolve against it.
HEALTH_EXAMPLE: dict[str, object] = json.loads(
    """
    {"ts": 1763850000.0, "device": "pi-line-3", "state": "ready", "uptime_s": 3600,
     "cpu": {"percent": 12.5, "per_core": [10.0, 15.0, 12.0, 13.0], "freq_mhz": 2400,
             "load": [0.5, 0.4, 0.3]},
     "memory": {"total_mb": 8048, "available_mb": 6500, "rss_mb": 420},
     "thermal": {"cpu_c": 54.2, "zones": {"cpu-thermal": 54.2},
                 "throttled": {"now": false, "since_boot": false, "flags": []}},
     "model": {"name": "qwen2.5-0.5b-instruct-q4_k_m", "threads": 3, "ctx": 2048},
     "queue": {"depth": 0, "capacity": 8},
     "counters": {"answered": 120, "errors": 2, "rejected": 1, "cancelled": 3},
     "last": {"tokens_per_s": 27.5, "first_token_ms": 180},
     "conversations": {"active": 3, "state_mb": 12.5}}
    """
)

HEALTH_TOPIC = "kiosk/pi-line-3/health"
STATUS_TOPIC = "kiosk/pi-line-3/status"


def messages(
    device_id: str = "pi-line-3", ha_prefix: str = "homeassistant", interval_s: float = 10.0
) -> list[tuple[str, dict[str, object]]]:
    return discovery_messages(
        device_id=device_id,
        ha_prefix=ha_prefix,
        health_topic=HEALTH_TOPIC,
        status_topic=STATUS_TOPIC,
        interval_s=interval_s,
        model_name="Raspberry Pi 5",
        sw_version="0.1.0",
    )


def by_object_id() -> dict[str, tuple[str, dict[str, object]]]:
    return {topic.split("/")[3]: (topic, payload) for topic, payload in messages()}


def component_of(topic: str) -> str:
    return topic.split("/")[1]


def resolve(document: object, dotted: str) -> object:
    for key in dotted.split("."):
        assert isinstance(document, dict), f"{dotted}: {key} is not inside an object"
        assert key in document, f"{dotted}: no {key!r} in the health JSON"
        document = document[key]
    return document


def test_one_config_per_entity_under_the_documented_topic_layout() -> None:
    topics = [topic for topic, _ in messages()]

    assert len(topics) == len(set(topics))
    for topic in topics:
        assert re.fullmatch(r"homeassistant/(sensor|binary_sensor)/pi-line-3/[a-z_]+/config", topic)
    assert set(by_object_id()) == {
        "cpu_temp",
        "cpu_percent",
        "memory_available",
        "rss",
        "queue_depth",
        "conversations",
        "state",
        "tokens_per_s",
        "throttled",
    }
    assert [component_of(t) for t in topics].count("binary_sensor") == 1


def test_every_key_is_a_documented_home_assistant_option() -> None:
    for topic, payload in messages():
        allowed = HA_SENSOR_OPTIONS if component_of(topic) == "sensor" else HA_BINARY_SENSOR_OPTIONS
        assert set(payload) <= allowed, f"{topic}: undocumented {set(payload) - allowed}"
        device = payload["device"]
        assert isinstance(device, dict)
        assert set(device) <= HA_DEVICE_OPTIONS


def test_required_keys_and_wiring() -> None:
    for topic, payload in messages():
        assert payload["state_topic"] == HEALTH_TOPIC, topic
        assert payload["availability_topic"] == STATUS_TOPIC, topic
        assert payload["payload_available"] == "online"
        assert payload["payload_not_available"] == "offline"
        assert payload["expire_after"] == 30
        assert isinstance(payload["name"], str)
        assert payload["name"]
        assert isinstance(payload["value_template"], str)
    # Publishable as is.
    for _, payload in messages():
        assert json.loads(json.dumps(payload)) == payload


def test_unique_ids_are_unique_and_stable_per_device() -> None:
    ids = [payload["unique_id"] for _, payload in messages()]
    other_ids = [payload["unique_id"] for _, payload in messages(device_id="pi-line-4")]

    assert len(set(ids)) == len(ids)
    assert ids == [payload["unique_id"] for _, payload in messages()]
    assert not set(ids) & set(other_ids)


def test_one_home_assistant_device_per_kiosk() -> None:
    devices = [payload["device"] for _, payload in messages()]

    assert all(device == devices[0] for device in devices)
    assert devices[0] == {
        "identifiers": ["kioskd_pi-line-3"],
        "name": "pi-line-3",
        "manufacturer": "kioskd",
        "model": "Raspberry Pi 5",
        "sw_version": "0.1.0",
    }


@pytest.mark.parametrize(
    ("interval_s", "expected_s"),
    [(10.0, 30), (10, 30), (2.5, 8), (0.2, 1), (1 / 3, 1), (3.3333333, 10), (60.0, 180)],
)
def test_expire_after_is_three_intervals_rounded_up(interval_s: float, expected_s: int) -> None:
    assert expire_after_s(interval_s) == expected_s
    for _, payload in messages(interval_s=interval_s):
        assert payload["expire_after"] == expected_s
        assert type(payload["expire_after"]) is int


@pytest.mark.parametrize("interval_s", [0.0, -5.0, float("nan")])
def test_nonsense_interval_is_rejected(interval_s: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        messages(interval_s=interval_s)


def test_every_template_reads_a_field_of_the_health_json() -> None:
    expected_paths = {
        "cpu_temp": "thermal.cpu_c",
        "cpu_percent": "cpu.percent",
        "memory_available": "memory.available_mb",
        "rss": "memory.rss_mb",
        "queue_depth": "queue.depth",
        "conversations": "conversations.active",
        "state": "state",
        "tokens_per_s": "last.tokens_per_s",
        "throttled": "thermal.throttled.now",
    }
    for object_id, (_, payload) in by_object_id().items():
        template = payload["value_template"]
        assert isinstance(template, str)
        paths = set(re.findall(r"value_json\.([a-z_.]+[a-z_])", template))
        assert paths == {expected_paths[object_id]}, object_id
        resolve(HEALTH_EXAMPLE, expected_paths[object_id])


def test_units_and_classes_match_home_assistant_device_classes() -> None:
    entities = {object_id: payload for object_id, (_, payload) in by_object_id().items()}

    assert entities["cpu_temp"]["device_class"] == "temperature"
    assert entities["cpu_temp"]["unit_of_measurement"] == "°C"
    assert entities["cpu_percent"]["unit_of_measurement"] == "%"
    for object_id in ("memory_available", "rss"):
        assert entities[object_id]["device_class"] == "data_size"
        assert entities[object_id]["unit_of_measurement"] in HA_DATA_SIZE_UNITS
    for object_id in (
        "cpu_temp",
        "cpu_percent",
        "memory_available",
        "rss",
        "queue_depth",
        "conversations",
    ):
        assert entities[object_id]["state_class"] == "measurement"
    assert entities["tokens_per_s"]["state_class"] == "measurement"
    # HA rejects options together with state_class or unit_of_measurement.
    state = entities["state"]
    assert state["device_class"] == "enum"
    assert state["options"] == list(HEALTH_STATES)
    assert "state_class" not in state
    assert "unit_of_measurement" not in state
    assert HEALTH_STATES == ("starting", "loading", "ready", "busy", "throttled", "draining")


def test_unknown_throttling_is_not_shown_as_off() -> None:
    _, throttled = by_object_id()["throttled"]
    template = throttled["value_template"]
    assert isinstance(template, str)

    assert throttled["payload_on"] == "ON"
    assert throttled["payload_off"] == "OFF"
    # HA turns the rendered text "None" into unknown; null must take that branch before any
    # truthiness test, or it would fall through to OFF.
    null_branch = template.index("is none %}None")
    assert null_branch < template.index("ON")
    assert null_branch < template.index("OFF")


def test_payloads_do_not_share_mutable_parts() -> None:
    first = messages()
    device = first[0][1]["device"]
    assert isinstance(device, dict)
    device["name"] = "edited"
    state_payload = next(p for t, p in first if t.endswith("/state/config"))
    options = state_payload["options"]
    assert isinstance(options, list)
    options.append("edited")

    other_device = first[1][1]["device"]
    assert isinstance(other_device, dict)
    assert other_device["name"] == "pi-line-3"
    assert by_object_id()["state"][1]["options"] == list(HEALTH_STATES)


@pytest.mark.parametrize(
    ("device_id", "node_id"),
    [("pi-line-3", "pi-line-3"), ("Pi_Line_3", "Pi_Line_3"), ("pi.line/3 #a", "pi_line_3__a")],
)
def test_node_id_keeps_the_topic_shape(device_id: str, node_id: str) -> None:
    assert node_id_for(device_id) == node_id
    for topic, _ in messages(device_id=device_id):
        assert topic.split("/")[2] == node_id
        assert topic.count("/") == 4


def test_prefix_with_trailing_slash_gives_the_same_topics() -> None:
    assert [t for t, _ in messages(ha_prefix="ha/")] == [t for t, _ in messages(ha_prefix="ha")]
    assert all(t.startswith("ha/") for t, _ in messages(ha_prefix="ha"))
