"""Secrets from files: the MQTT password from its file or systemd's $CREDENTIALS_DIRECTORY.

There is no config key, environment variable or option that holds a secret itself, and what is
read here is never logged or printed (docs/security.md, "Secrets").
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.config.errors import ConfigError


def read_mqtt_password(password_file: str | None) -> str | None:
    """The password in `password_file`, else in the systemd credential; None when there is none."""
    path = password_file
    if path is None:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            return None
        path = str(Path(credentials) / "mqtt-password")
        if not Path(path).is_file():
            return None
    try:
        # The unit's fallback credential is a lone newline: that means "no password".
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError([f"mqtt.password_file: cannot read {path}: {exc.strerror}"]) from exc
    return password or None
