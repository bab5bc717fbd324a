"""`kioskd status --fleet F`: one line per kiosk of a fleet, from what the broker retains."""

from __future__ import annotations

import argparse
import json
from typing import Any

from daemon import exitcodes
from daemon.asker import UnavailableError, read_retained
from daemon.cli.ask import describe_age
from daemon.cli.target import EXIT_CODES, Target, say


def fleet_status(args: argparse.Namespace, target: Target) -> int:
    """One line per member of fleet F: every kiosk whose retained health names F."""
    try:
        # Everything retained: the members' own prefixes are not known beforehand.
        retained = read_retained(
            ["#"], host=target.host, port=target.port, timeout_s=args.timeout_s, login=target.login
        )
    except UnavailableError as exc:
        say("status", str(exc))
        return EXIT_CODES[exc.reason]
    members = []
    for topic, payload in sorted(retained.payloads.items()):
        if not topic.endswith("/health"):
            continue
        try:
            health = json.loads(payload)
        except ValueError:
            continue
        fleet = health.get("fleet") if isinstance(health, dict) else None
        if isinstance(fleet, dict) and fleet.get("prefix") == args.fleet:
            prefix = topic.removesuffix("/health")
            status = retained.payloads.get(f"{prefix}/status", b"unknown").decode(
                "utf-8", "replace"
            )
            members.append((prefix, status, health))
    if args.json:
        print(json.dumps([h for _p, _s, h in members], indent=2, ensure_ascii=False))
    else:
        for prefix, status, health in members:
            print(fleet_line(prefix, status, health, retained.read_at))
    if not members:
        say(
            "status",
            f"no kiosk of fleet {args.fleet} on {target.where}: no retained health names it "
            "(is fleet.prefix set on the kiosks, and may this user read their topics?)",
        )
        return exitcodes.NO_KIOSK
    if not any(status == "online" for _p, status, _h in members):
        say("status", f"every kiosk of fleet {args.fleet} is offline")
        return exitcodes.KIOSK_OFFLINE
    return exitcodes.OK


def fleet_line(prefix: str, status: str, health: dict[str, Any], now: float) -> str:
    """'line-3  kiosk/line-3  online  ready  in the share  queue 0/8  54.2 C  3 s ago'."""
    fleet, queue = health.get("fleet") or {}, health.get("queue") or {}
    cpu_c = (health.get("thermal") or {}).get("cpu_c")
    share = "in the share" if fleet.get("member") and status == "online" else "out of the share"
    age = describe_age(now - float(health.get("ts", now)))
    return (
        f"{health.get('device', '?'):<16} {prefix:<24} {status:<8} {health.get('state', '?'):<10}"
        f" {share:<16} queue {queue.get('depth', '?')}/{queue.get('capacity', '?')}  "
        f"{'-' if cpu_c is None else f'{cpu_c} C'}  {age}"
    )
