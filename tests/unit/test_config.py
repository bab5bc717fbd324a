"""Config: defaults, checks, unknown keys with their line, and `kioskd check-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import Config, ConfigError, describe, from_dict, load, sanitize_device_id

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "kioskd.yaml"

REQUIRED_KEYS = {
    "mqtt.host",
    "mqtt.port",
    "mqtt.topic_prefix",
    "mqtt.client_id",
    "mqtt.keepalive_s",
    "mqtt.reply_prefixes",
    "model.path",
    "model.threads",
    "model.ctx",
    "model.max_tokens",
    "model.temperature",
    "model.system_prompt",
    "model.chat_format",
    "queue.capacity",
    "limits.max_question_chars",
    "limits.max_payload_bytes",
    "shutdown.grace_s",
    "telemetry.interval_s",
}


def test_every_required_key_is_declared_with_a_doc() -> None:
    declared = {path: doc for path, _default, doc in describe()}
    assert set(declared) >= REQUIRED_KEYS
    assert all(doc.strip() for doc in declared.values())


def test_shipped_config_lists_every_key_with_its_default_and_a_comment() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    lines = SHIPPED.read_text().splitlines()
    for path, default, _doc in describe():
        *sections, key = path.split(".")
        node = raw
        for section in sections:
            node = node[section]
        assert key in node, f"{path} missing from config/kioskd.yaml"
        assert node[key] == default or str(node[key]) == str(default), path
        indent = "  " * len(sections)
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{indent}{key}:"))
        assert lines[index - 1].strip().startswith("#"), f"{path} has no comment above it"
    assert load(SHIPPED) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load(empty) == Config()


def test_misspelled_key_names_path_line_and_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  host: broker\n  prot: 1883\nmodel:\n  threds: 2\n")
    with pytest.raises(ConfigError) as caught:
        load(bad)
    problems = caught.value.problems
    assert f"{bad}:3: mqtt.prot: unknown key (did you mean mqtt.port?)" in problems
    assert f"{bad}:5: model.threds: unknown key (did you mean model.threads?)" in problems


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"mqtt": {"port": 70000}}, "mqtt.port: must be between 1 and 65535"),
        ({"mqtt": {"port": "1883"}}, "mqtt.port: must be a whole number"),
        ({"mqtt": {"protocol": 5}}, "mqtt.protocol: must be a string"),
        ({"mqtt": {"protocol": "4"}}, "mqtt.protocol: must be one of 5, 3.1.1"),
        ({"mqtt": {"topic_prefix": "kiosk/#"}}, "mqtt.topic_prefix: must not contain"),
        ({"mqtt": {"reply_prefixes": ["a/", "$SYS/"]}}, "mqtt.reply_prefixes: each prefix"),
        ({"model": {"temperature": 3}}, "model.temperature: must be between 0 and 2"),
        ({"model": {"threads": 0}}, "model.threads: must be at least 1"),
        ({"model": {"max_tokens": True}}, "model.max_tokens: must be a whole number"),
        ({"queue": {"capacity": -1}}, "queue.capacity: must be between 0 and 1000"),
        ({"queue": None, "limit": {}}, "limit: unknown section (did you mean limits?)"),
        ({"shutdown": {"grace_s": float("nan")}}, "shutdown.grace_s: must be a number"),
        ({"mqtt": ["host"]}, "mqtt: must be a mapping"),
        ({"logging": {"level": "LOUD"}}, "logging.level: must be one of"),
        ({"mqtt": {"device_id": "line/3"}}, "mqtt.device_id: must be 1-64 characters"),
        ({"mqtt": {"device_id": "#"}}, "mqtt.device_id: must be 1-64 characters"),
    ],
)
def test_bad_values_are_reported(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(raw)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"mqtt": {"port": 0, "hots": "x"}, "queue": {"capacity": "many"}})
    assert len(caught.value.problems) == 3


def test_derived_values() -> None:
    config = from_dict(
        {
            "mqtt": {"device_id": "line-3", "reply_prefixes": ["{device_id}/r/"]},
            "model": {"threads": 3},
        }
    )
    assert config.topic_prefix == "kiosk/line-3"
    assert config.client_id == "kioskd-line-3"
    assert config.reply_prefixes == ("line-3/r/",)
    assert (config.threads, config.threads_batch) == (3, 3)
    assert Config().reply_prefixes == (f"{Config().topic_prefix}/answer/",)
    assert Config().threads >= 1
    assert isinstance(from_dict({"shutdown": {"grace_s": 2}}).shutdown.grace_s, float)


def test_device_id_sanitising() -> None:
    assert sanitize_device_id("Pi-Line.3 West") == "pi-line-3-west"
    assert sanitize_device_id("jetson_orin") == "jetson_orin"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("mqtt:\n  host: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load(bad)
    assert caught.value.problems[0].startswith(f"{bad}:")
    assert "invalid YAML" in caught.value.problems[0]


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


def test_check_config_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  host: broker\n\n  prot: 1883\n")
    result = _check_config(bad)
    assert result.returncode == 1
    assert f"{bad}:4: mqtt.prot: unknown key (did you mean mqtt.port?)" in result.stderr
    good = _check_config(SHIPPED)
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout


def test_run_with_a_bad_config_exits_with_the_config_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue:\n  capasity: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 78
    assert "queue.capasity: unknown key (did you mean queue.capacity?)" in result.stderr


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    for path, _default, _doc in describe():
        assert f"| `{path}` |" in readme, f"{path} is not in README.md's key table"
