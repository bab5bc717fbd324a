"""`kioskd ask` and `kioskd status`: one kiosk as a terminal user sees it, with exit codes that
say what is missing (broker, login, kiosk) instead of a traceback or a long wait."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from daemon import exitcodes
from daemon.asker import (
    Answer,
    UnavailableError,
    ask,
    no_kiosk_message,
    offline_message,
    read_retained,
)
from daemon.cli import askformat
from daemon.cli.printer import stream_printer
from daemon.cli.target import (
    EXIT_CODES,
    EXIT_CODES_HELP,
    Target,
    add_target_options,
    resolve_target,
    say,
)
from daemon.messages import ID_PATTERN, ID_RULE, new_request_id
from daemon.topics import Topics


def add_commands(commands: Any) -> None:
    """The `ask` and `status` subcommands, on kioskd's argparse subparsers."""
    ask = commands.add_parser(
        "ask",
        help="ask a kiosk a question and print the streamed answer",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("question")
    add_target_options(ask)
    ask.add_argument(
        "--fleet",
        metavar="F",
        help="ask the fleet with prefix F (F/ask, one kiosk of it answers) instead of one kiosk",
    )
    ask.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")
    ask.add_argument("--json", action="store_true", help="print every stream message as JSON")
    ask.add_argument(
        "--no-stream", action="store_true", help='ask with "stream": false (one message at the end)'
    )
    ask.add_argument(
        "--conversation",
        metavar="ID",
        type=conversation_id_arg,
        help="ask it as the next turn of conversation ID (1-64 of A-Z a-z 0-9 . _ -); "
        "the kiosk keeps the earlier turns (see `kioskd chat`)",
    )
    ask.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="N",
        help="every reply at most N bytes as an MQTT packet (192-65536), as a tiny device asks",
    )
    askformat.add_options(ask)
    ask.set_defaults(handler=run_ask)

    status = commands.add_parser(
        "status",
        help="print a kiosk's latest health as a table",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_options(status)
    status.add_argument(
        "--fleet",
        metavar="F",
        help="one line per kiosk of the fleet with prefix F, found by their retained health",
    )
    status.add_argument(
        "--timeout-s", type=float, default=2.0, help="wait this long for the retained messages"
    )
    status.add_argument("--json", action="store_true", help="print the raw health JSON")
    status.set_defaults(handler=run_status)


def conversation_id_arg(value: str) -> str:
    """argparse type of a conversation id: refused here rather than by the kiosk."""
    if not ID_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"a conversation id is {ID_RULE}")
    return value


def run_ask(args: argparse.Namespace) -> int:
    target = resolve_target(args, "ask")
    if target is None:
        return exitcodes.CONFIG_ERROR
    if (shape := askformat.options(args)) is None:
        return exitcodes.FAILURE
    answer = Answer(new_request_id())
    show = stream_printer(as_json=args.json)

    try:
        ask(
            args.question,
            host=target.host,
            port=target.port,
            # A fleet has no status topic of its own: its members' are checked by `status`.
            prefix=args.fleet or target.prefix,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            timeout_s=args.timeout_s,
            on_message=show,
            stream=not args.no_stream,
            max_message_bytes=args.max_message_bytes,
            stop=shape.stop,
            answer_format=shape.answer_format,
            check_status=args.fleet is None,
            login=target.login,
            into=answer,
            conversation_id=args.conversation,
        )
        return _ask_result(args, target, answer)
    except UnavailableError as exc:
        say("ask", str(exc))
        return EXIT_CODES[exc.reason]
    except KeyboardInterrupt:
        # A second Ctrl-C while this line is written must not end in a traceback either.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _end_line(args, answer)
        say("ask", f"interrupted; {_cancel_note(target, answer)}")
        return exitcodes.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`); the standard recipe: stop quietly, and point stdout
        # at /dev/null so that Python's final flush at exit does not fail once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.OUTPUT_CLOSED


def _ask_result(args: argparse.Namespace, target: Target, answer: Answer) -> int:
    final = answer.final
    if final is None:
        _end_line(args, answer)
        say(
            "ask",
            f"no answer within {args.timeout_s:g} s from {target.prefix} on {target.where}; "
            f"{_cancel_note(target, answer)}",
        )
        return exitcodes.NO_ANSWER
    if final.get("type") == "error":
        _end_line(args, answer)
        retry = final.get("retry_after_s")
        hint = f" (retry after {retry} s)" if retry is not None else ""
        say("ask", f"error {final.get('code')}: {final.get('message')}{hint}")
        return exitcodes.FAILURE
    if not args.json:
        print(flush=True)
    if (missing := askformat.missing_json(args, final)) is not None:
        say("ask", f"the answer is not the JSON asked for: {missing}")
        return exitcodes.FAILURE
    return exitcodes.OK


def _end_line(args: argparse.Namespace, answer: Answer) -> None:
    """End a half-printed answer line so that the next message starts on its own."""
    if not args.json and any(m.get("type") == "chunk" for m in answer.messages):
        print(flush=True)


def _cancel_note(target: Target, answer: Answer) -> str:
    if not answer.sent_monotonic:
        return "the question was not sent"
    confirmed = (
        "the broker acknowledged it"
        if answer.cancel_acknowledged
        else "the broker did not confirm it in time"
    )
    return f"asked {target.prefix} to cancel {answer.request_id} ({confirmed})"


def run_status(args: argparse.Namespace) -> int:
    target = resolve_target(args, "status")
    if target is None:
        return exitcodes.CONFIG_ERROR
    if args.fleet:
        from daemon.cli.fleet import fleet_status  # noqa: PLC0415 - it imports this module

        return fleet_status(args, target)
    topics = Topics(target.prefix)
    try:
        retained = read_retained(
            [topics.status, topics.health],
            host=target.host,
            port=target.port,
            timeout_s=args.timeout_s,
            login=target.login,
        )
    except UnavailableError as exc:
        say("status", str(exc))
        return EXIT_CODES[exc.reason]
    status_payload = retained.payloads.get(topics.status)
    status = None if status_payload is None else status_payload.decode("utf-8", "replace")
    health: dict[str, Any] | None = None
    if topics.health in retained.payloads:
        try:
            health = json.loads(retained.payloads[topics.health])
        except ValueError:
            say("status", f"{topics.health} is not JSON: {retained.payloads[topics.health]!r}")
    if health is not None:
        # An offline kiosk's last health still tells what it was doing, and how long ago.
        if args.json:
            print(json.dumps(health, indent=2, ensure_ascii=False))
        else:
            print(render_health(target.prefix, status or "unknown", health, retained.read_at))
    if status is None:
        say("status", no_kiosk_message(topics, target.where))
        return exitcodes.NO_KIOSK
    if status != "online":
        say("status", offline_message(topics, target.where, status))
        return exitcodes.KIOSK_OFFLINE
    if health is None:
        say("status", f"{target.prefix} is online, but nothing is retained on {topics.health}")
        return exitcodes.FAILURE
    return exitcodes.OK


def _conversations(section: Any) -> str:
    if not isinstance(section, dict):
        return "-"  # a kiosk from before conversations
    return (
        f"{section.get('active')} conversations kept, {section.get('state_mb')} MiB of model state"
    )


def describe_age(age_s: float) -> str:
    """'3 s ago', '5 min ago', '2.5 h ago', '3.0 days ago' (or how far ahead a clock is)."""
    if age_s < -2:
        return f"{-age_s:.0f} s in the future (the kiosk's clock is ahead)"
    age_s = max(age_s, 0.0)
    if age_s < 120:
        return f"{age_s:.0f} s ago"
    if age_s < 7200:
        return f"{age_s / 60:.0f} min ago"
    if age_s < 2 * 86400:
        return f"{age_s / 3600:.1f} h ago"
    return f"{age_s / 86400:.1f} days ago"


def render_health(prefix: str, status: str, health: dict[str, Any], now: float) -> str:
    """A kiosk's health as a short table for a terminal; null readings show as '-'."""

    def show(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    cpu, memory, thermal = health["cpu"], health["memory"], health["thermal"]
    throttled = thermal["throttled"]
    zones = ", ".join(f"{name} {show(temp, ' C')}" for name, temp in thermal["zones"].items())
    cores = " ".join(show(c) for c in cpu["per_core"] or [])
    load = " ".join(show(x) for x in cpu["load"] or [])
    model, queue, counters, last = (
        health["model"],
        health["queue"],
        health["counters"],
        health["last"],
    )
    ts = health.get("ts")
    sent = (
        f"from {describe_age(now - ts)} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))})"
        if isinstance(ts, int | float)
        else "of unknown age (no ts)"
    )
    rows = [
        (
            "Kiosk",
            f"{prefix} ({health['device']}): {status}, state {health['state']}, "
            f"up {health['uptime_s']} s",
        ),
        ("Health", sent),
        (
            "CPU",
            f"{show(cpu['percent'], ' %')} [{cores}], {show(cpu['freq_mhz'], ' MHz')}, "
            f"load {load or '-'}",
        ),
        (
            "Memory",
            f"{show(memory['available_mb'])} of {show(memory['total_mb'])} MiB free, "
            f"kioskd RSS {show(memory['rss_mb'], ' MiB')}",
        ),
        (
            "Thermal",
            f"CPU {show(thermal['cpu_c'], ' C')}; throttled now "
            f"{show(throttled['now'])}, since boot {show(throttled['since_boot'])} "
            f"{' '.join(throttled['flags'])}".rstrip(),
        ),
        ("Zones", zones or "-"),
        (
            "Model",
            f"{show(model['name'])}, {show(model['threads'])} threads, ctx {show(model['ctx'])}",
        ),
        ("Queue", f"{queue['depth']} waiting of {queue['capacity']}"),
        ("Chats", _conversations(health.get("conversations"))),
        ("Counters", ", ".join(f"{k} {v}" for k, v in counters.items())),
        (
            "Last",
            f"{show(last['tokens_per_s'], ' tok/s')}, first token "
            f"{show(last['first_token_ms'], ' ms')}",
        ),
    ]
    return "\n".join(f"{name:<9} {text}" for name, text in rows)
