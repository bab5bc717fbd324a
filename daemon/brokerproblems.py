"""What is wrong with the broker connection, in words for the operator.

Refusals, takeovers by another client with our id, and brokers that cannot be reached are each
named once: logged, kept as the connection's `problem`, and reported to the app (systemd's
STATUS= line). Works from what paho reports, without importing it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A connection dropped this soon after it was made, this often in 60 s, is reported as another
# client using our client id (the broker hands the session back and forth between us).
_SHORT_CONNECTION_S = 5.0
_TAKEOVERS_REPORTED = 3


class ConnectionProblems:
    """The connection's current problem; each change is logged and reported once."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        tls_context: ssl.SSLContext | None,
        on_problem: Callable[[str | None], None] | None,
    ) -> None:
        self._host = host
        self._port = port
        self._client_id = client_id
        self._tls_context = tls_context
        self._on_problem = on_problem
        self.problem: str | None = None
        self._takeovers: list[float] = []
        self._connected_at = 0.0
        self._connack_refused = False

    def refused(self, reason_code: object) -> None:
        """The broker refused the connection in its CONNACK."""
        self._connack_refused = True
        self._set_problem(
            f"broker {self._host}:{self._port} refused the connection: "
            f"{reason_code} (check mqtt.username / the password)"
        )

    def connected(self) -> None:
        self._connected_at = time.monotonic()
        if len(self._takeovers) < _TAKEOVERS_REPORTED:
            self._set_problem(None)

    def disconnected(self, reason_code: object, *, was_connected: bool) -> None:
        # MQTT 5 brokers may say "Session taken over"; mosquitto 2.0 just closes the socket,
        # so a connection that keeps dropping right after it was made counts too.
        short_lived = time.monotonic() - self._connected_at < _SHORT_CONNECTION_S
        if reason_code == "Session taken over" or (was_connected and short_lived):
            self._note_takeover()
        if was_connected and reason_code != 0:
            log.warning("lost the broker (%s); reconnecting", reason_code)
        elif not was_connected and not self._connack_refused:
            # TCP (and TLS) worked, but the broker closed before accepting us.
            hint = (
                "a missing or rejected client certificate (mqtt.tls.cert_file)?"
                if self._tls_context is not None
                else "see the broker's log"
            )
            self._set_problem(
                f"broker {self._host}:{self._port} closed the connection before accepting "
                f"it ({reason_code}); {hint}"
            )
        # A refusal in CONNACK explains this attempt's disconnect; the next attempt is new.
        self._connack_refused = False

    def subscription_refused(self, topic: str, code: object) -> None:
        # Typically an ACL: the kiosk would sit online and never hear a question.
        self._set_problem(
            f"broker refused the subscription to {topic}: {code} "
            "(check the broker's ACL for this user)"
        )

    def connect_failed(self) -> None:
        # paho's retry loop swallows the reason; probe once to name it for the operator.
        self._set_problem(self._diagnose())

    def _diagnose(self) -> str:
        where = f"{self._host}:{self._port}"
        try:
            with socket.create_connection((self._host, self._port), timeout=5) as sock:
                if self._tls_context is not None:
                    with self._tls_context.wrap_socket(sock, server_hostname=self._host):
                        pass
        except ssl.SSLCertVerificationError as exc:
            return f"TLS: the certificate of broker {where} was rejected: {exc.verify_message}"
        except ssl.SSLError as exc:
            return f"TLS handshake with broker {where} failed: {exc.reason or exc}"
        except OSError as exc:
            return f"cannot reach broker {where}: {exc.strerror or exc}"
        return f"connecting to broker {where} failed (TCP and TLS work; see the broker's log)"

    def _note_takeover(self) -> None:
        now = time.monotonic()
        self._takeovers = [t for t in self._takeovers if now - t < 60] + [now]
        if len(self._takeovers) >= _TAKEOVERS_REPORTED:
            self._set_problem(
                f"the broker dropped us {len(self._takeovers)} times in 60 s right after "
                f"connecting: most likely another client uses client id {self._client_id!r}; "
                "give each kiosk its own mqtt.client_id"
            )

    def _set_problem(self, problem: str | None) -> None:
        """Record the current connection problem; log and report each change once."""
        if problem == self.problem:
            return
        self.problem = problem
        if problem is not None:
            log.error("%s (retrying with backoff)", problem.rstrip("."))
        if self._on_problem is not None:
            self._on_problem(problem)
