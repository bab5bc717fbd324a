"""Rules across keys: errors that tie two keys together, and warnings for risky settings."""

from __future__ import annotations

from daemon.config.listen import remote_listen_problem
from daemon.config.schema import Config


def cross_checks(config: Config) -> list[tuple[str, str]]:
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
