"""`kioskd chat`: one conversation with a kiosk at a terminal prompt.

Each line typed is the next turn; the answer streams as it comes. Ctrl-C stops the answer
(the turn is cancelled and not remembered) and Ctrl-C at the prompt clears the line, as in a
shell; Ctrl-D at the prompt quits. The kiosk keeps the conversation until conversations.ttl_s
after its last answer, so `--conversation ID` continues it later.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from daemon import exitcodes
from daemon.asker import Answer, UnavailableError, ask
from daemon.cli.ask import conversation_id_arg
from daemon.cli.printer import stream_printer
from daemon.cli.target import (
    EXIT_CODES,
    EXIT_CODES_HELP,
    Target,
    add_target_options,
    resolve_target,
    say,
)
from daemon.messages import new_request_id

PROMPT = "> "


def add_command(commands: Any) -> None:
    """The `chat` subcommand, on kioskd's argparse subparsers."""
    chat = commands.add_parser(
        "chat",
        help="talk with a kiosk: each line is a follow-up question in one conversation",
        description=__doc__,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_options(chat)
    chat.add_argument(
        "--conversation",
        metavar="ID",
        type=conversation_id_arg,
        help="continue this conversation (default: a new one with an unguessable id)",
    )
    chat.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--timeout-s", type=float, default=120.0, help="give up on an answer after this long"
    )
    chat.add_argument("--json", action="store_true", help="print every stream message as JSON")
    chat.set_defaults(handler=run_chat)


def new_conversation_id() -> str:
    """16 random bytes: whoever knows a conversation's id can continue it (docs/security.md)."""
    return secrets.token_urlsafe(16)


def run_chat(args: argparse.Namespace) -> int:
    target = resolve_target(args, "chat")
    if target is None:
        return exitcodes.CONFIG_ERROR
    conversation = args.conversation or new_conversation_id()
    if sys.stdin.isatty():
        import readline  # noqa: F401, PLC0415 - line editing and history for input()

        say(
            "chat",
            f"{target.prefix} on {target.where}, conversation {conversation}; Ctrl-C stops "
            "an answer, Ctrl-D quits",
        )
    check_status = True
    while True:
        try:
            question = input(PROMPT)
        except EOFError:
            print(flush=True)
            break
        except KeyboardInterrupt:
            print(flush=True)  # as a shell does: drop the line, prompt again
            continue
        if not question.strip():
            continue
        try:
            final = _turn(args, target, question, conversation, check_status=check_status)
        except UnavailableError as exc:
            say("chat", str(exc))
            return EXIT_CODES[exc.reason]
        check_status = False
        if final is not None and final.get("type") == "error":
            say("chat", f"error {final.get('code')}: {final.get('message')}")
    say("chat", f"bye; continue later with: kioskd chat --conversation {conversation}")
    return exitcodes.OK


def _turn(
    args: argparse.Namespace,
    target: Target,
    question: str,
    conversation: str,
    *,
    check_status: bool,
) -> dict[str, Any] | None:
    """Ask one turn and show its answer; returns the terminal message (None: none came)."""
    answer = Answer(new_request_id())
    show = stream_printer(as_json=args.json)

    try:
        ask(
            question,
            host=target.host,
            port=target.port,
            prefix=target.prefix,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            timeout_s=args.timeout_s,
            on_message=show,
            check_status=check_status,
            login=target.login,
            into=answer,
            conversation_id=conversation,
        )
    except KeyboardInterrupt:
        # ask() has cancelled the question on the kiosk before it raised.
        print("\n[stopped; this turn is not remembered]", file=sys.stderr, flush=True)
        return None
    if not args.json:
        print(flush=True)
    if answer.final is None:
        say("chat", f"no answer within {args.timeout_s:g} s; the question was cancelled")
    return answer.final
