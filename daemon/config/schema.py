"""Typed configuration: YAML file -> nested dict -> one frozen dataclass per section.

Every key is declared once below with its default and a one-line doc (the field's `doc`
metadata). Loading is layered (`load` reads and locates keys, `from_dict` checks and builds)
so that tests build configs from dicts. Errors name the key path and, from a file, its line.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

_Check = Callable[[Any], str | None]


def _key(default: Any, doc: str, check: _Check | None = None) -> Any:
    """Declare a config key with its default, its one-line doc and an optional value check."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, "check": check})
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(minimum: float) -> _Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _between(low: float, high: float) -> _Check:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(*choices: str) -> _Check:
    return lambda value: None if value in choices else "must be one of " + ", ".join(choices)


def _topic_prefix(value: str) -> str | None:
    if not value or value.startswith(("/", "$")) or value.endswith("/"):
        return "must be non-empty, not start with '/' or '$', and not end with '/'"
    if any(c in value for c in "+#\0"):
        return "must not contain MQTT wildcards (+, #) or NUL"
    return None


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


def _log_level(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in levels else "must be one of " + ", ".join(levels)


# Short, plain and about the shop floor: a base model copies the length and tone it is shown.
DEFAULT_EXAMPLES = [
    {
        "question": "What is a PLC?",
        "answer": "A programmable logic controller: a small industrial computer that runs a "
        "machine's control program.",
    },
    {
        "question": "What should I do if a machine jams?",
        "answer": "Press the stop button, lock out the machine, then clear the jam or call "
        "maintenance.",
    },
    {
        "question": "Why must I wear safety glasses?",
        "answer": "They protect your eyes from chips, dust and splashes.",
    },
]


def _examples(value: Any) -> str | None:
    rule = "must be a list of {question: ..., answer: ...} with non-empty strings"
    if not isinstance(value, list):
        return rule
    for example in value:
        if not isinstance(example, dict) or set(example) != {"question", "answer"}:
            return rule
        if not all(isinstance(text, str) and text.strip() for text in example.values()):
            return rule
    return None


def _stops(value: list[str]) -> str | None:
    if len(value) > 4 or not all(1 <= len(stop) <= 64 for stop in value):
        return "must be at most 4 strings of 1-64 characters"
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


@dataclass(frozen=True)
class ModelConfig:
    """Which model answers, and how it is run."""

    path: str | None = _key(
        None, "GGUF file; null = the production model if fetched, else the embedded Gemma 3 270M"
    )
    dir: str | None = _key(
        None,
        "where fetch-model stores models; null = $STATE_DIRECTORY/models or "
        "~/.local/share/kioskd/models",
    )
    threads: int | None = _key(
        None, "decode threads; null = physical cores minus one, at least 1", _at_least(1)
    )
    threads_batch: int | None = _key(
        None, "prompt (prefill) threads; null = same as threads", _at_least(1)
    )
    ctx: int = _key(2048, "context window in tokens (prompt + answer)", _between(256, 131072))
    batch_tokens: int = _key(
        128,
        "prompt tokens computed per step; scratch memory grows with it, prefill speed barely does",
        _between(8, 4096),
    )
    mmap: bool = _key(
        False,
        "map the GGUF instead of reading it: repacked weights are then held twice (+13 MiB)",
    )
    gpu_layers: int = _key(
        0,
        "model layers offloaded to the GPU of a CUDA build (a Jetson); 0 = CPU only, 999 = all",
        _between(0, 999),
    )
    max_tokens: int = _key(
        256, "longest answer in tokens; requests may ask for fewer", _at_least(1)
    )
    temperature: float = _key(0.7, "default sampling temperature (0 = greedy)", _between(0, 2))
    system_prompt: str = _key(
        "You are a helpful assistant on a factory-floor kiosk. Answer briefly and plainly.",
        "system turn put before every question; clients cannot change it",
    )
    chat_format: str = _key(
        "auto",
        "chat format when the GGUF embeds no template: auto (from the model's "
        "architecture), chatml, gemma or llama-3",
        _one_of("auto", "chatml", "gemma", "llama-3"),
    )
    seed: int = _key(-1, "sampling seed; -1 = random", _at_least(-1))
    prompt_style: str = _key(
        "auto",
        "chat (the chat template) or completion (a Question:/Answer: frame with examples, for "
        "base models); auto = chat when the GGUF embeds a template, else completion",
        _one_of("auto", "chat", "completion"),
    )
    examples: list[dict[str, str]] = _key(
        DEFAULT_EXAMPLES,
        "completion style: question/answer pairs shown before every question",
        _examples,
    )
    stop: list[str] = _key([], "stop strings for every answer, besides the request's", _stops)
    repeat_penalty: float = _key(
        1.0, "penalty on tokens of the last 64 repeated (1.0 = off)", _between(1.0, 2.0)
    )


@dataclass(frozen=True)
class QueueConfig:
    """The bounded queue in front of the single generation worker."""

    capacity: int = _key(8, "requests that may wait behind the running one", _between(0, 1000))


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a client may send."""

    max_question_chars: int = _key(2000, "longest accepted question", _at_least(1))
    max_payload_bytes: int = _key(65536, "largest accepted request payload", _at_least(64))
    max_schema_bytes: int = _key(
        8192, "largest JSON schema a request's format may bring, as compact JSON", _at_least(64)
    )
    max_requests_per_s: float | None = _key(
        None,
        "questions per second accepted from one sender (see docs/security.md); null = no limit",
        _positive,
    )
    dedup_s: float = _key(
        60.0,
        "a retry with the same id and question this soon after its answer gets that answer again",
        _positive,
    )
    dedup_max_ids: int = _key(
        1024, "ended request ids remembered for dedup_s (bounds the memory)", _between(1, 100000)
    )


@dataclass(frozen=True)
class ConversationsConfig:
    """Follow-up questions: what is kept of a conversation, for how long, and where."""

    max_context_tokens: int | None = _key(
        None,
        "budget of a turn's whole prompt in model tokens; older turns are dropped to fit; "
        "null = model.ctx - model.max_tokens",
        _at_least(16),
    )
    ttl_s: float = _key(
        300.0, "a conversation is forgotten this long after its last answer", _positive
    )
    max_active: int = _key(
        32, "conversations kept; beyond this the least recently used is dropped", _between(1, 10000)
    )
    max_state_mb: float = _key(
        64.0,
        "memory (and disk) for saved model state of conversations; least recently used first "
        "out (their text stays); 0 = keep none",
        _at_least(0),
    )
    persist: bool = _key(True, "keep conversations across a restart of kioskd (saved to disk)")
    dir: str | None = _key(
        None,
        "where conversations are saved; null = $STATE_DIRECTORY/conversations or "
        "~/.local/share/kioskd/conversations",
    )


@dataclass(frozen=True)
class ShutdownConfig:
    """What happens on SIGTERM."""

    grace_s: float = _key(
        5.0, "time the running answer may take to finish on shutdown", _at_least(0)
    )


def _command(value: list[str] | None) -> str | None:
    return None if value is None or value else "must be a non-empty list, or null to disable"


@dataclass(frozen=True)
class StreamConfig:
    """How answer text is cut into chunk messages."""

    flush_ms: float = _key(
        0.0,
        "after the first chunk, gather text for this long per chunk (0 = every token at once)",
        _between(0, 5000),
    )
    max_chunk_chars: int | None = _key(
        None, "longest chunk text in characters; null = no limit", _at_least(1)
    )


@dataclass(frozen=True)
class TelemetryConfig:
    """Health publishing and where the hardware readings come from."""

    interval_s: float = _key(
        30.0, "seconds between retained P/health messages and thermal checks", _at_least(0.2)
    )
    sys_root: str = _key("/sys", "root of the sysfs tree with thermal zones and cpufreq")
    vcgencmd: list[str] | None = _key(
        ["vcgencmd", "get_throttled"], "Raspberry Pi throttle query; null = not a Pi", _command
    )


@dataclass(frozen=True)
class ThermalConfig:
    """Thermal back-off: work less hard instead of letting the firmware throttle."""

    soft_limit_c: float = _key(
        75.0, "at or above: one generation thread fewer per telemetry interval, down to 1"
    )
    hard_limit_c: float = _key(82.0, "at or above: no new generations (error overheated)")
    resume_below_c: float = _key(
        70.0, "below: take questions again and add back one thread per interval"
    )


@dataclass(frozen=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery."""

    enabled: bool = _key(False, "publish discovery configs so Home Assistant shows this kiosk")
    prefix: str = _key("homeassistant", "Home Assistant's discovery prefix", _topic_prefix)


@dataclass(frozen=True)
class WatchdogConfig:
    """systemd watchdog: when to stop pinging so that a hung daemon is restarted."""

    stall_s: float = _key(
        90.0, "a generation with no new token for this long counts as hung", _between(1, 3600)
    )


def _listen(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


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


@dataclass(frozen=True)
class WebConfig:
    """`kioskd web`, the touch page for a screen (docs/security.md, "The kiosk screen")."""

    listen: str = _key(
        "127.0.0.1:8080",
        "HOST:PORT the kiosk screen's web service listens on; a non-loopback host needs "
        "web.allow_remote",
        _listen,
    )
    allow_remote: bool = _key(
        False, "allow web.listen off loopback: anyone who reaches it may ask and cancel"
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Log output."""

    level: str = _key(
        "INFO", "DEBUG, INFO, WARNING or ERROR; question text is logged only at DEBUG", _log_level
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
        path = self.mqtt.password_file
        if path is None:
            credentials = os.environ.get("CREDENTIALS_DIRECTORY")
            if not credentials:
                return None
            path = str(Path(credentials) / "mqtt-password")
            if not Path(path).is_file():
                return None
        try:
            # The unit's fallback credential is a lone newline: that means "no password".
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError([f"mqtt.password_file: cannot read {path}: {exc.strerror}"]) from exc
        return password or None

    @property
    def threads(self) -> int:
        return self.model.threads or default_threads()

    @property
    def threads_batch(self) -> int:
        return self.model.threads_batch or self.threads


def sanitize_device_id(name: str) -> str:
    """Lower-case `name` and replace characters outside [a-z0-9_-] with '-' (docs/protocol.md)."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower()) or "kiosk"


def default_threads() -> int:
    """Physical cores minus one, leaving a core for the broker client and the OS."""
    import psutil  # noqa: PLC0415 - only needed when the operator left threads unset

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, physical - 1)


class ConfigError(Exception):
    """One or more configuration problems, each naming its key path and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_Section = TypeVar("_Section")


def load(path: str | Path) -> Config:
    """Read, locate and check a YAML config file; raise ConfigError naming key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    return from_dict(raw if raw is not None else {}, lines=lines, source=str(path))


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key_path = f"{prefix}{key_node.value}"
        lines[key_path] = key_node.start_mark.line + 1
        _record_lines(value_node, key_path + ".", lines)


def from_dict(
    raw: Mapping[str, Any], *, lines: Mapping[str, int] | None = None, source: str = "<config>"
) -> Config:
    """Build a Config from nested dicts, collecting every problem before raising ConfigError."""
    lines = lines or {}
    problems: list[str] = []

    def where(key_path: str) -> str:
        line = lines.get(key_path)
        return f"{source}:{line}" if line else source

    if not isinstance(raw, Mapping):
        raise ConfigError([f"{source}: the top level must be a mapping of sections"])
    sections: dict[str, Any] = {}
    section_types = get_type_hints(Config)
    for name, value in raw.items():
        if name not in section_types:
            problems.append(
                f"{where(str(name))}: {name}: unknown section{_hint(name, section_types)}"
            )
            continue
        keys = {} if value is None else value
        if not isinstance(keys, Mapping):
            problems.append(f"{where(name)}: {name}: must be a mapping of keys")
            continue
        sections[name] = _build_section(section_types[name], name, keys, where, problems)
    if problems:
        raise ConfigError(problems)
    config = Config(**sections)
    problems = [f"{where(path)}: {path}: {problem}" for path, problem in _cross_checks(config)]
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[tuple[str, str]]:
    """Rules that tie two keys together, as (key path, problem)."""
    thermal, mqtt = config.thermal, config.mqtt
    problems = []
    if config.fleet.prefix is not None:
        if config.fleet.prefix == config.topic_prefix:
            problems.append(("fleet.prefix", "must differ from the kiosk's own mqtt.topic_prefix"))
        if mqtt.protocol != "5":
            problems.append(
                ("fleet.prefix", "a fleet needs mqtt.protocol '5' (shared subscriptions)")
            )
    if not thermal.soft_limit_c < thermal.hard_limit_c:
        problems.append(("thermal.soft_limit_c", "must be below thermal.hard_limit_c"))
    if not thermal.resume_below_c < thermal.soft_limit_c:
        problems.append(("thermal.resume_below_c", "must be below thermal.soft_limit_c"))
    if mqtt.reconnect_min_s > mqtt.reconnect_max_s:
        problems.append(("mqtt.reconnect_min_s", "must not exceed mqtt.reconnect_max_s"))
    budget = config.conversations.max_context_tokens
    if budget is not None and budget >= config.model.ctx:
        problems.append(("conversations.max_context_tokens", "must be below model.ctx"))
    problem = remote_listen_problem(config.web.listen, allow_remote=config.web.allow_remote)
    if problem:
        problems.append(("web.listen", problem))
    return problems


def config_warnings(config: Config) -> list[str]:
    """Settings that work but will likely hurt; check-config prints them, run logs them."""
    found = []
    held = config.queue.capacity + 1
    if held + 1 > config.mqtt.broker_inflight_limit:
        found.append(
            f"queue.capacity: {config.queue.capacity} waiting + 1 running questions stay "
            f"unacknowledged until answered, which leaves no room under "
            f"mqtt.broker_inflight_limit ({config.mqtt.broker_inflight_limit}) for a cancel: "
            "the broker would hold cancels back; lower queue.capacity or raise the broker's "
            "max_inflight_messages (and this key)"
        )
    return found


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine; a name other than localhost is not trusted."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_listen_problem(listen: str, *, allow_remote: bool) -> str | None:
    """Why `listen` may not be used, or None: off loopback it needs web.allow_remote."""
    try:
        host, _port = parse_listen(listen)
    except ValueError:
        return None  # reported by the key's own check
    if is_loopback(host) or allow_remote:
        return None
    return (
        f"{host} is not a loopback address: anyone who can reach it could ask and cancel; "
        "set web.allow_remote: true to allow it (see docs/security.md)"
    )


def _build_section(
    cls: type[_Section],
    section: str,
    values: Mapping[str, Any],
    where: Callable[[str], str],
    problems: list[str],
) -> _Section:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    types = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key_path = f"{section}.{key}"
        if key not in fields:
            known = {f"{section}.{k}": None for k in fields}
            problems.append(f"{where(key_path)}: {key_path}: unknown key{_hint(key_path, known)}")
            continue
        if dataclasses.is_dataclass(types[key]):  # a nested section such as mqtt.tls
            if value is not None and not isinstance(value, Mapping):
                problems.append(f"{where(key_path)}: {key_path}: must be a mapping of keys")
                continue
            kwargs[key] = _build_section(types[key], key_path, value or {}, where, problems)
            continue
        problem = _check_value(types[key], value, fields[key].metadata.get("check"))
        if problem:
            problems.append(f"{where(key_path)}: {key_path}: {problem} (got {value!r})")
            continue
        expected = types[key]
        kwargs[key] = (
            float(value) if expected in (float, float | None) and value is not None else value
        )
    return cls(**kwargs)


def _check_value(expected: Any, value: Any, check: _Check | None) -> str | None:
    optional = expected in (str | None, int | None, float | None, list[str] | None)
    if value is None:
        return None if optional else "must not be empty"
    base = {str | None: str, int | None: int, float | None: float, list[str] | None: list}.get(
        expected, expected
    )
    if base == list[str]:  # a generic alias is equal to, not the same object as, another
        base = list
    if base is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return "must be a number"
    elif base is bool:
        if not isinstance(value, bool):
            return "must be true or false"
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
    elif base is str:
        if not isinstance(value, str):
            return "must be a string (quote it)"
    elif base is list and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        return "must be a list of strings"
    return check(value) if check else None


def _hint(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
