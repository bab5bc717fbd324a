"""Command line: run, check-config, ask, fetch-model."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from daemon import __version__, exitcodes
from daemon.config import Config, ConfigError, load, sanitize_device_id

log = logging.getLogger("daemon")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kioskd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kioskd {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=_check_config)

    ask = commands.add_parser("ask", help="ask a kiosk a question and print the streamed answer")
    ask.add_argument("question")
    _add_target_options(ask)
    ask.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")
    ask.add_argument("--json", action="store_true", help="print every stream message as JSON")
    ask.set_defaults(handler=_ask)

    fetch = commands.add_parser(
        "fetch-model", help="download the production model (Qwen2.5-0.5B-Instruct)"
    )
    fetch.add_argument("--config", type=Path, help="use model.dir from this config")
    fetch.add_argument("--dir", type=Path, help="target directory (default: the models dir)")
    fetch.add_argument("--url", help="download from this https:// or file:// URL instead")
    fetch.set_defaults(handler=_fetch_model)
    return parser


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="read broker and prefix from this config")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default 1883)")
    parser.add_argument("--prefix", help="the kiosk's topic prefix (default kiosk/<hostname>)")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_or_report(path: Path | None) -> Config | None:
    if path is None:
        return Config()
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.CONFIG_ERROR
    _setup_logging(config.logging.level)
    from daemon.app import App  # noqa: PLC0415 - keeps check-config and ask free of llama.cpp

    return App(config).run()


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.FAILURE
    print(f"{args.config}: OK (device {config.device_id}, topics under {config.topic_prefix}/)")
    return exitcodes.OK


def _ask(args: argparse.Namespace) -> int:
    from daemon.asker import Answer, ask  # noqa: PLC0415

    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.CONFIG_ERROR
    host = args.host or config.mqtt.host
    port = args.port or config.mqtt.port
    if args.prefix:
        prefix = args.prefix
    elif args.config:
        prefix = config.topic_prefix
    else:
        prefix = f"kiosk/{sanitize_device_id(socket.gethostname())}"

    def show(message: dict[str, object]) -> None:
        if args.json:
            print(json.dumps(message, ensure_ascii=False), flush=True)
        elif message.get("type") == "chunk":
            print(message.get("text", ""), end="", flush=True)
        elif message.get("type") == "queued":
            print(f"[queued, position {message.get('position')}]", file=sys.stderr, flush=True)

    answer: Answer = ask(
        args.question,
        host=host,
        port=port,
        prefix=prefix,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        timeout_s=args.timeout_s,
        on_message=show,
    )
    if answer.final is None:
        print(
            f"\nno answer within {args.timeout_s:g} s from {prefix} on {host}:{port}",
            file=sys.stderr,
        )
        return 2
    if answer.final.get("type") == "error":
        print(f"error {answer.final.get('code')}: {answer.final.get('message')}", file=sys.stderr)
        return exitcodes.FAILURE
    if not args.json:
        print()
    return exitcodes.OK


def _fetch_model(args: argparse.Namespace) -> int:
    from daemon.models import PRODUCTION, FetchError, fetch, models_dir  # noqa: PLC0415

    _setup_logging("INFO")
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.CONFIG_ERROR
    target_dir = args.dir or models_dir(config.model.dir)
    started = time.monotonic()
    try:
        path = fetch(PRODUCTION, target_dir, url=args.url)
    except FetchError as exc:
        print(f"fetch-model: {exc}", file=sys.stderr)
        return exitcodes.FAILURE
    print(
        f"{path} ready ({time.monotonic() - started:.1f} s); kioskd will use it when "
        "model.path is null"
    )
    return exitcodes.OK
