"""Command line: run, check-config, ask, status, chat, web, fetch-model, bench.

One module per command group; each adds its subcommands to the one parser here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from daemon import __version__
from daemon.cli import ask, bench, chat, service


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.handler(args))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kioskd", description="An offline question-answering kiosk on MQTT."
    )
    top.add_argument("--version", action="version", version=f"kioskd {__version__}")
    commands = top.add_subparsers(required=True, metavar="COMMAND")
    service.add_commands(commands)
    ask.add_commands(commands)
    chat.add_command(commands)
    bench.add_command(commands)
    return top
