"""Fixtures: a real mosquitto on a free loopback port, the real daemon, a unique prefix per test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.daemon import MOSQUITTO, REPO, Broker, Daemon, DaemonFactory, free_port
from tests.support.mqtt_client import TestClient


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the session; tests stay apart through their own topic prefixes."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed; run scripts/setup")
    instance = Broker(free_port(), tmp_path_factory.mktemp("mosquitto"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker this test may stop and start; not started yet."""
    instance = Broker(free_port(), tmp_path)
    yield instance
    instance.stop()


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(broker: Broker) -> Iterator[TestClient]:
    instance = TestClient(broker.port)
    yield instance
    instance.close()


@pytest.fixture(scope="session")
def model_path() -> Path:
    from daemon.models import embedded_model  # noqa: PLC0415

    return embedded_model()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def start_daemon(
    broker: Broker, prefix: str, tmp_path: Path, model_path: Path
) -> Iterator[DaemonFactory]:
    """Start the real daemon; by default its config sets only mqtt.host, port and topic_prefix."""
    started: list[Daemon] = []

    def start(
        config: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wait_online: bool = True,
        name: str = "kioskd",
        launcher: Sequence[str] = (),
    ) -> Daemon:
        base = {"mqtt": {"host": "127.0.0.1", "port": port or broker.port, "topic_prefix": prefix}}
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(_merge(base, config or {})))
        log_path = tmp_path / f"{name}.log"
        process_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # A fetched production model in the developer's home must not change the tests.
            "XDG_DATA_HOME": str(tmp_path / "data"),
            **(env or {}),
        }
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                # launcher: a command that execs the rest (tests/support/wx_filter.py).
                [*launcher, sys.executable, "-m", "daemon", "run", "--config", str(config_path)],
                cwd=REPO,
                env=process_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        daemon = Daemon(process, prefix, log_path, config_path)
        started.append(daemon)
        if wait_online:
            watcher = TestClient(port or broker.port)
            try:
                watcher.subscribe(daemon.topic("status"))
                watcher.wait_status(daemon.topic("status"), b"online", timeout_s=60)
            except TimeoutError:
                pytest.fail(f"daemon did not come online; log:\n{daemon.log()}")
            finally:
                watcher.close()
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


@pytest.fixture
def slow_tokens() -> dict[str, str]:
    """Hooks for a request that runs long enough to queue behind, cancel or interrupt."""
    return {"KIOSKD_TEST_IGNORE_EOS": "1", "KIOSKD_TEST_TOKEN_DELAY_MS": "40"}
