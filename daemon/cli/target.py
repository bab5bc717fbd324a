"""Which broker and kiosk a client command (ask, status, chat) talks to, and how it says what
went wrong: one line on stderr and an exit code, instead of a traceback or a long wait."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from daemon import exitcodes
from daemon.asker import Login, Reason
from daemon.config import Config, ConfigError, load, sanitize_device_id

EXIT_CODES_HELP = f"""exit codes:
  {exitcodes.OK:<3}  answered (ask); online with a health message (status)
  {exitcodes.FAILURE:<3}  an error, or no JSON as asked for (ask); online, no health (status)
  {exitcodes.NO_KIOSK:<3}  no kiosk at this prefix on this broker (no retained P/status)
  {exitcodes.BROKER_UNREACHABLE:<3}  the broker cannot be reached
  {exitcodes.KIOSK_OFFLINE:<3}  the kiosk is offline
  {exitcodes.BROKER_REFUSED:<3}  the broker refused the login or a subscription
  {exitcodes.CONFIG_ERROR:<3}  --config cannot be read or is invalid
  {exitcodes.NO_ANSWER:<3}  no answer within --timeout-s (ask; the question is cancelled)
  {exitcodes.INTERRUPTED:<3}  Ctrl-C (ask; the question is cancelled)
  {exitcodes.OUTPUT_CLOSED:<3}  output closed, e.g. by `| head` (ask; the question is cancelled)
"""

EXIT_CODES = {
    Reason.NO_KIOSK: exitcodes.NO_KIOSK,
    Reason.BROKER_UNREACHABLE: exitcodes.BROKER_UNREACHABLE,
    Reason.KIOSK_OFFLINE: exitcodes.KIOSK_OFFLINE,
    Reason.BROKER_REFUSED: exitcodes.BROKER_REFUSED,
}


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    prefix: str
    login: Login

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _quiet_retries(record: logging.LogRecord) -> bool:
    """broker.Connection logs each problem as it retries; this CLI says it once, then exits."""
    return not record.getMessage().endswith("(retrying with backoff)")


def say(command: str, text: str) -> None:
    print(f"kioskd {command}: {text}", file=sys.stderr, flush=True)


def resolve_target(args: argparse.Namespace, command: str) -> Target | None:
    """Broker, login and kiosk prefix from --host/--port/--prefix, else --config; None: reported."""
    logging.getLogger("daemon.broker").addFilter(_quiet_retries)
    try:
        config = Config() if args.config is None else load(args.config)
        login = Login(
            username=config.mqtt.username,
            password=config.mqtt_password(),
            tls_context=config.mqtt.tls.ssl_context(),
            protocol=config.mqtt.protocol,
        )
    except ConfigError as exc:
        if isinstance(exc.__cause__, PermissionError) and args.config is not None:
            say(command, config_unreadable(args.config))
            return None
        for problem in exc.problems:
            say(command, problem)
        return None
    host = args.host or config.mqtt.host
    port = args.port or config.mqtt.port
    if args.prefix:
        prefix = args.prefix
    elif args.config:
        prefix = config.topic_prefix
    else:
        prefix = f"kiosk/{sanitize_device_id(socket.gethostname())}"
    return Target(host, port, prefix, login)


def config_unreadable(path: Path) -> str:
    """Why an operator cannot read the config (0640 root:kioskd when installed), and the ways in."""
    import grp  # noqa: PLC0415 - only for this message

    try:
        group = grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        group = "kioskd"
    return (
        f"cannot read {path}: permission denied; run with sudo, or add yourself to group "
        f"{group} (sudo usermod -aG {group} $USER, then log in again)"
    )


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="read broker and prefix from this config")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default 1883)")
    parser.add_argument("--prefix", help="the kiosk's topic prefix (default kiosk/<hostname>)")
