"""What the kiosk says about itself: its own sections of P/health, and SIGUSR1's state line.

The monitor adds the sensors' sections to the health snapshot; systemd's STATUS= line is the
app's, since it follows the lifecycle.
"""

from __future__ import annotations

from daemon.broker import Connection
from daemon.conversations import ConversationStore
from daemon.fleet import FleetMember
from daemon.monitor import Snapshot
from daemon.scheduler import Scheduler


def health_snapshot(
    state: str,
    *,
    model_name: str | None,
    threads: int,
    ctx: int,
    scheduler: Scheduler,
    conversations: ConversationStore,
    fleet: FleetMember | None,
) -> Snapshot:
    """The daemon's sections of a P/health message (docs/protocol.md, "Health")."""
    counters = scheduler.counters
    return Snapshot(
        state=state,
        model={
            "name": model_name,
            "threads": threads,
            "ctx": ctx,
        },
        queue={"depth": scheduler.depth, "capacity": scheduler.capacity},
        counters={
            "answered": counters.answered,
            "errors": counters.errors,
            "rejected": counters.rejected,
            "cancelled": counters.cancelled,
        },
        last={
            "tokens_per_s": _round(counters.last_tokens_per_s),
            "first_token_ms": _round(counters.last_first_token_ms),
        },
        conversations={
            "active": conversations.active,
            "state_mb": round(conversations.state_bytes / 2**20, 1),
        },
        fleet=None
        if fleet is None
        else {
            "prefix": fleet.topics.prefix,
            "group": fleet.group,
            "member": fleet.member,
        },
    )


def state_line(
    state: str,
    *,
    scheduler: Scheduler,
    conversations: ConversationStore,
    connection: Connection,
    held: int,
    model_name: str | None,
    threads: int,
    cpu_c: float | None,
) -> str:
    """One line for SIGUSR1: what kioskd is doing and holding (`held`: unacknowledged questions)."""
    counters = scheduler.counters
    return (
        f"{state}; running {scheduler.running_id or '-'}, queue "
        f"{scheduler.depth}/{scheduler.capacity}, conversations "
        f"{conversations.active} ({conversations.state_bytes / 2**20:.1f} MiB of "
        f"state), unacknowledged questions "
        f"{held}; broker {'connected' if connection.connected else 'away'}"
        f"{'' if connection.problem is None else f' ({connection.problem})'}; "
        f"model {model_name or '-'}, threads {threads}, CPU "
        f"{'-' if cpu_c is None else f'{cpu_c:.1f} C'}; answered {counters.answered}, "
        f"errors {counters.errors}, rejected {counters.rejected}, cancelled "
        f"{counters.cancelled}"
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
