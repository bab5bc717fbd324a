"""Listen addresses (HOST:PORT): parse them, and refuse one off loopback unless allowed."""

from __future__ import annotations

import ipaddress


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine; a name other than localhost is not trusted."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_listen_problem(listen: str, *, allow_remote: bool) -> str | None:
    """Why `listen` may not be used, or None: off loopback it needs web.allow_remote."""
    try:
        host, _port = parse_listen(listen)
    except ValueError:
        return None  # reported by the key's own check
    if is_loopback(host) or allow_remote:
        return None
    return (
        f"{host} is not a loopback address: anyone who can reach it could ask and cancel; "
        "set web.allow_remote: true to allow it (see docs/security.md)"
    )
