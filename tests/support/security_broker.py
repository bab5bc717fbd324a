"""A mosquitto with TLS, passwords and an ACL, built from the shipped examples in config/mosquitto/.

The certificates come from config/mosquitto/make-test-certs.sh and the broker config and ACL are
the example files with only ports and paths swapped, so the examples cannot drift from what the
tests prove. Also here: an MQTT 5 client that speaks TLS with a user name, and a stand-in for
systemd's notify socket.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.bench.localbroker import launch, terminate
from tests.support.daemon import REPO, free_port
from tests.support.mqtt_client import TestClient

EXAMPLES = REPO / "config" / "mosquitto"
MAKE_CERTS = EXAMPLES / "make-test-certs.sh"

# The kiosk's user name is its device id: the example ACL grants kiosk/%u/... to it.
KIOSK_USER = "line-3"
KIOSK_PREFIX = f"kiosk/{KIOSK_USER}"
TERMINAL_USER = "terminal"


@dataclass(frozen=True)
class Pki:
    """Files made by make-test-certs.sh, run twice: the broker's own CA, and another one whose
    server certificate names a host that is not 127.0.0.1."""

    ca: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path
    expired_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path
    wrong_name_cert: Path
    wrong_name_key: Path

    def server(self, certificate: str) -> tuple[Path, Path]:
        """(certificate, key) for the broker: "valid", "expired" or "wrong_name"."""
        return {
            "valid": (self.server_cert, self.server_key),
            "expired": (self.expired_cert, self.expired_key),
            "wrong_name": (self.wrong_name_cert, self.wrong_name_key),
        }[certificate]


def make_pki(root: Path) -> Pki:
    right, other = root / "pki", root / "other-pki"
    for args in (["-d", str(right), "-e"], ["-d", str(other), "-s", "DNS:broker.invalid"]):
        subprocess.run([str(MAKE_CERTS), *args], check=True, capture_output=True)
    return Pki(
        ca=right / "ca.crt",
        server_cert=right / "server.crt",
        server_key=right / "server.key",
        expired_cert=right / "server-expired.crt",
        expired_key=right / "server-expired.key",
        client_cert=right / "client.crt",
        client_key=right / "client.key",
        wrong_ca=other / "ca.crt",
        wrong_name_cert=other / "server.crt",
        wrong_name_key=other / "server.key",
    )


def new_password() -> str:
    """A password unlikely to appear in a log by chance, so a grep for it means a leak."""
    return f"pw-{uuid.uuid4().hex}"


def write_passwd(path: Path, users: dict[str, str]) -> None:
    """A mosquitto password file (hashed) made with mosquitto_passwd, as README.md tells."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True)


def example_config(
    *, port: int, mtls_port: int, files: dict[str, Path], server_cert: Path, server_key: Path
) -> str:
    """config/mosquitto/mosquitto.conf for a test: loopback ports, temporary files, no disk.

    Besides the example's listener, a second one requires client certificates (the example's
    commented-out `require_certificate true`).
    """
    replaced = {
        "password_file": files["passwd"],
        "acl_file": files["acl"],
        "cafile": files["ca"],
        "certfile": server_cert,
        "keyfile": server_key,
    }
    dropped = {"persistence", "persistence_location", "log_dest", "user", "pid_file"}
    lines = []
    listener_lines: list[str] = []
    for example_line in (EXAMPLES / "mosquitto.conf").read_text().splitlines():
        key, _, _value = example_line.partition(" ")
        if not example_line or example_line.startswith("#") or key in dropped:
            continue
        line = example_line
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key in replaced:
            line = f"{key} {replaced[key]}"
        lines.append(line)
        if key == "listener" or listener_lines:
            listener_lines.append(line)
    assert listener_lines, "the example has no listener"
    mtls = [f"listener {mtls_port} 127.0.0.1", *listener_lines[1:], "require_certificate true"]
    return "\n".join(
        [
            *lines,
            *mtls,
            "persistence false",
            # stderr, not a file, and no change of user: the files live in pytest's tmp dir.
            "log_dest stderr",
            "log_type all",
            "user root",
            "",
        ]
    )


@dataclass
class SecureBroker:
    """mosquitto with the example config: TLS listener (+ one requiring client certificates),
    password file with a kiosk and a terminal user, the example ACL."""

    workdir: Path
    pki: Pki
    kiosk_password: str = field(default_factory=new_password)
    terminal_password: str = field(default_factory=new_password)
    port: int = field(default_factory=free_port)
    mtls_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, certificate: str = "valid") -> None:
        """Start with the "valid", "expired" or "wrong_name" server certificate."""
        passwd, acl = self.workdir / "passwd", self.workdir / "acl"
        write_passwd(
            passwd, {KIOSK_USER: self.kiosk_password, TERMINAL_USER: self.terminal_password}
        )
        acl.write_text((EXAMPLES / "acl").read_text())
        cert, key = self.pki.server(certificate)
        config = example_config(
            port=self.port,
            mtls_port=self.mtls_port,
            files={"passwd": passwd, "acl": acl, "ca": self.pki.ca},
            server_cert=cert,
            server_key=key,
        )
        try:
            self.process = launch(self.workdir, config, self.port, self.mtls_port)
        except TimeoutError:
            raise TimeoutError(f"mosquitto did not start; its log:\n{self.log()}") from None

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def connections_as(self, client_id: str) -> int:
        """How many times a client with this id got past TLS and authentication."""
        accepted = rf"New client connected from \S+ as {re.escape(client_id)} "
        return len(re.findall(accepted, self.log()))


DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def dynsec_client(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    """A dynamic-security client entry; the hash is the plugin's (PBKDF2-SHA512, 101 rounds)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
        "roles": [{"rolename": role} for role in roles],
    }


def _allow(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


@dataclass
class DynsecBroker:
    """mosquitto on TLS with the dynamic-security plugin instead of acl_file.

    mosquitto 2.0's acl_file grants every SUBSCRIBE and filters at delivery; the plugin refuses
    a SUBSCRIBE that no role allows (SUBACK "Not authorized"), which kioskd can then report.
    The kiosk user may read only KIOSK_PREFIX/ask and /cancel and write only KIOSK_PREFIX/#.
    """

    workdir: Path
    pki: Pki
    kiosk_password: str = field(default_factory=new_password)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        security = {
            "clients": [dynsec_client(KIOSK_USER, self.kiosk_password, ["kiosk"])],
            "roles": [
                {
                    "rolename": "kiosk",
                    "acls": [
                        _allow("subscribePattern", f"{KIOSK_PREFIX}/ask"),
                        _allow("subscribePattern", f"{KIOSK_PREFIX}/cancel"),
                        _allow("publishClientSend", f"{KIOSK_PREFIX}/#"),
                    ],
                }
            ],
            "defaultACLAccess": {
                "publishClientSend": False,
                "publishClientReceive": True,
                "subscribe": False,
                "unsubscribe": True,
            },
        }
        (self.workdir / "dynamic-security.json").write_text(json.dumps(security))
        config = "\n".join(
            [
                "per_listener_settings false",
                "allow_anonymous false",
                f"plugin {DYNSEC_PLUGIN}",
                f"plugin_opt_config_file {self.workdir / 'dynamic-security.json'}",
                "persistence false",
                "log_dest stderr",
                "log_type all",
                "user root",
                f"listener {self.port} 127.0.0.1",
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "",
            ]
        )
        self.process = launch(self.workdir, config, self.port)

    def stop(self) -> None:
        terminate(self.process)
        self.process = None


def client_tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


class SecureClient(TestClient):
    """TestClient over TLS with a user name and password; fails fast if the broker refuses it.

    TestClient connects in its constructor, so this one builds the same client state itself and
    then connects with TLS; the waiting and stream helpers are TestClient's.
    """

    __test__ = False

    def __init__(
        self, port: int, *, ca: Path, username: str, password: str, host: str = "127.0.0.1"
    ) -> None:
        self._cond = threading.Condition()
        self.received = []
        self._acked: set[int] = set()
        self._connack: list[Any] = []
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.tls_set_context(client_tls_context(ca))
        self._client.username_pw_set(username, password)
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect = self._on_connect
        self._client.connect(host, port)
        self._client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack, timeout=10):
                raise TimeoutError("no CONNACK")
        if self._connack[0].is_failure:
            self.close()
            raise ConnectionRefusedError(f"broker refused the test client: {self._connack[0]}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, *args: Any) -> None:
        with self._cond:
            self._connack.append(reason)
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe, and fail if the ACL refuses it (a refused subscription hears nothing)."""
        codes: list[Any] = []

        def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, *args: Any) -> None:
            codes.extend(reasons)
            self._on_subscribe(client, userdata, mid)

        self._client.on_subscribe = on_subscribe
        super().subscribe(topic, qos)
        self._client.on_subscribe = self._on_subscribe
        refused = [code for code in codes if code.is_failure]
        if refused:
            raise PermissionError(f"broker refused the subscription to {topic}: {refused[0]}")


def wait_for_log(read_log: Any, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
    """The first match of regex `pattern` in the text `read_log()` returns, polling."""
    deadline = time.monotonic() + timeout_s
    while True:
        match = re.search(pattern, read_log())
        if match is not None:
            return match
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} within {timeout_s} s in:\n{read_log()}")
        time.sleep(0.1)


def daemon_config(
    port: int, *, ca: Path | None = None, password_file: Path | None = None, **mqtt: Any
) -> dict[str, Any]:
    """A kioskd config for start_daemon: TLS to 127.0.0.1:`port` as the kiosk, quick retries."""
    tls: dict[str, Any] = {"enabled": True}
    if ca is not None:
        tls["ca_file"] = str(ca)
    section: dict[str, Any] = {
        "host": "127.0.0.1",  # the certificate's IP SAN
        "port": port,
        "username": KIOSK_USER,
        "device_id": KIOSK_USER,
        "topic_prefix": KIOSK_PREFIX,
        "tls": tls,
        "reconnect_min_s": 1,
        "reconnect_max_s": 2,
    }
    if password_file is not None:
        section["password_file"] = str(password_file)
    section.update(mqtt)
    return {"mqtt": section, "logging": {"level": "DEBUG"}}
