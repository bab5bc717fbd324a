"""Every MQTT topic kioskd uses, built from the prefix here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """The topics under one kiosk's prefix P (docs/protocol.md, "Topics")."""

    prefix: str

    @property
    def ask(self) -> str:
        return f"{self.prefix}/ask"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/cancel"

    @property
    def forget(self) -> str:
        return f"{self.prefix}/forget"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def health(self) -> str:
        return f"{self.prefix}/health"

    @property
    def error(self) -> str:
        return f"{self.prefix}/error"

    @property
    def answer_prefix(self) -> str:
        return f"{self.prefix}/answer/"

    def shared_ask(self, group: str) -> str:
        """The MQTT 5 shared subscription to this prefix's ask topic (docs/protocol.md, "Fleet")."""
        return f"$share/{group}/{self.ask}"

    def answer(self, request_id: str) -> str:
        """Default reply topic; callers pass only validated ids (no '/', '+', '#')."""
        return f"{self.answer_prefix}{request_id}"


def is_allowed_reply_topic(topic: str, allowed_prefixes: tuple[str, ...]) -> bool:
    """Whether an MQTT 5 Response Topic may be published to (docs/protocol.md, "MQTT 5: Response
    Topic and Correlation Data")."""
    if not topic or topic.startswith("$") or any(c in topic for c in "+#\0"):
        return False
    return any(topic.startswith(prefix) for prefix in allowed_prefixes)


def reply_topic_problem(topic: str, allowed_prefixes: tuple[str, ...]) -> str:
    """For a person: why a Response Topic is refused (the caller knows that it is)."""
    allowed = " or ".join(repr(p) for p in allowed_prefixes)
    if not topic:
        problem = "the response topic is empty"
    elif topic.startswith("$"):
        problem = f"response topic {topic!r} starts with '$', which is reserved for the broker"
    elif any(c in topic for c in "+#"):
        problem = (
            f"response topic {topic!r} contains a wildcard ('+' or '#'); a reply needs one "
            "exact topic"
        )
    elif "\0" in topic:
        problem = "the response topic contains a NUL character"
    else:
        return f"response topic {topic!r} is not allowed; use a topic starting with {allowed}"
    return f"{problem}; use an exact topic starting with {allowed}"


def homeassistant_status(ha_prefix: str) -> str:
    """Where Home Assistant announces `online` after its own restart."""
    return f"{ha_prefix.rstrip('/')}/status"


def homeassistant_config(ha_prefix: str, component: str, node_id: str, object_id: str) -> str:
    """A Home Assistant MQTT discovery config topic."""
    return f"{ha_prefix.rstrip('/')}/{component}/{node_id}/{object_id}/config"
