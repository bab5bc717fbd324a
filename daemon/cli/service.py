"""`kioskd run`, `check-config`, `web` and `fetch-model`: the commands that start a kiosk or
prepare one."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import time
from pathlib import Path

from daemon import exitcodes
from daemon.cli.target import config_unreadable
from daemon.config import Config, ConfigError, config_warnings, load


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=_check_config)

    web = commands.add_parser("web", help="serve the kiosk's touch page (docs: README)")
    web.add_argument("--config", type=Path, help="YAML config file (mqtt and web sections)")
    web.add_argument("--listen", metavar="HOST:PORT", help="instead of web.listen")
    web.set_defaults(handler=_web)

    fetch = commands.add_parser(
        "fetch-model", help="download the production model (Qwen2.5-0.5B-Instruct)"
    )
    fetch.add_argument("--config", type=Path, help="use model.dir from this config")
    fetch.add_argument("--dir", type=Path, help="target directory (default: the models dir)")
    fetch.add_argument("--url", help="download from this https:// or file:// URL instead")
    fetch.set_defaults(handler=_fetch_model)


def console_logging(level: str) -> None:
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
        if isinstance(exc.__cause__, PermissionError):
            print(config_unreadable(path), file=sys.stderr)
            return None
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    try:
        config = Config() if args.config is None else load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        from daemon.startfailure import report_config_error  # noqa: PLC0415

        report_config_error(args.config, exc.problems)
        return exitcodes.CONFIG_ERROR
    from daemon.service import setup_logging  # noqa: PLC0415

    setup_logging(config.logging.level)
    # A watchdog kill (SIGABRT) then leaves every thread's traceback in the journal.
    faulthandler.enable()
    from daemon.app import App  # noqa: PLC0415 - keeps check-config and ask free of llama.cpp

    try:
        app = App(config, config_path=args.config)
    except ConfigError as exc:  # e.g. an unreadable password file
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    return app.run()


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.FAILURE
    for warning in config_warnings(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK (device {config.device_id}, topics under {config.topic_prefix}/)")
    return exitcodes.OK


def _web(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.CONFIG_ERROR
    from daemon.service import setup_logging  # noqa: PLC0415
    from daemon.web.server import run  # noqa: PLC0415 - aiohttp only for this command

    setup_logging(config.logging.level)
    return run(config, args.listen)


def _fetch_model(args: argparse.Namespace) -> int:
    from daemon.models import PRODUCTION, FetchError, fetch, models_dir  # noqa: PLC0415

    console_logging("INFO")
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
