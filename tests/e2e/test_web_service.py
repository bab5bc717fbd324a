"""`kioskd web` without a browser: where it listens, what it serves, whom it answers, and that
a page can only ask and cancel (a real broker, no daemon: the test plays the kiosk's status)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from daemon import exitcodes
from daemon.config import ConfigError, from_dict
from tests.support.daemon import REPO, Broker
from tests.support.mqtt_client import Received, TestClient
from tests.support.web_service import WebFactory, web

__all__ = ["web"]  # the fixture

PAGE_IDS = ("question", "ask", "stop", "new", "answer", "status")


@pytest.mark.parametrize(
    ("listen", "allow_remote"),
    [
        ("127.0.0.1:8080", False),
        ("localhost:9000", False),
        ("[::1]:8080", False),
        ("0.0.0.0:8080", True),
        ("[::]:8080", True),
        ("panel.lan:80", True),
    ],
)
def test_listen_accepted(listen: str, allow_remote: bool) -> None:
    config = from_dict({"web": {"listen": listen, "allow_remote": allow_remote}})

    assert config.web.listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.168.1.20:8080", "[::]:80", "kiosk:80"])
def test_listen_off_loopback_needs_allow_remote(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"web\.listen: .*web\.allow_remote: true"):
        from_dict({"web": {"listen": listen}})


@pytest.mark.parametrize(
    "listen", ["8080", "localhost", "::1:8080", "host:http", ":8080", "a:70000"]
)
def test_listen_must_be_host_and_port(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"web\.listen: must be HOST:PORT|web\.listen: write"):
        from_dict({"web": {"listen": listen}})


def test_cli_refuses_a_remote_listen_address_without_allow_remote() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "web", "--listen", "0.0.0.0:18080"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == exitcodes.CONFIG_ERROR
    assert "refusing to listen on 0.0.0.0:18080" in result.stderr
    assert "web.allow_remote" in result.stderr


@pytest.fixture
def config_path(tmp_path: Path, broker: Broker, prefix: str) -> Path:
    path = tmp_path / "kioskd.yaml"
    config = {"mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_page_is_served_with_its_hooks_and_a_strict_policy(
    web: WebFactory, config_path: Path
) -> None:
    url = web(config_path).url

    async def fetch() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 200
                page = await response.text()
                policy = response.headers["Content-Security-Policy"]
            for asset in ("static/app.js", "static/style.css"):
                async with session.get(url + asset) as response:
                    assert response.status == 200, asset
            # DNS rebinding: another name that resolves to 127.0.0.1 gets nothing.
            async with session.get(url, headers={"Host": "attacker.example"}) as response:
                assert response.status == 403
        for element_id in PAGE_IDS:
            assert f'id="{element_id}"' in page
        assert 'data-state="idle"' in page
        assert "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "http" not in page.replace("http-equiv", ""), "no CDN or other outside address"

    asyncio.run(fetch())


def test_websocket_from_another_origin_is_refused(web: WebFactory, config_path: Path) -> None:
    url = web(config_path).url

    async def connect(origin: str | None) -> int:
        headers = {} if origin is None else {"Origin": origin}
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url + "ws", headers=headers) as socket:
                    await socket.close()
                    return 101
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status

    assert asyncio.run(connect("http://attacker.example")) == 403
    assert asyncio.run(connect(None)) == 403
    assert asyncio.run(connect(url.rstrip("/"))) == 101


def test_page_can_only_ask_and_cancel(
    web: WebFactory, config_path: Path, client: TestClient, prefix: str
) -> None:
    url = web(config_path).url
    client.subscribe("#")
    # The kiosk's retained status, as the daemon would publish it.
    client.publish(f"{prefix}/status", "online", retain=True)

    async def session() -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as socket,
        ):

            async def until(kind: str) -> dict[str, Any]:
                while True:
                    message = json.loads(await socket.receive_str(timeout=10))
                    received.append(message)
                    if message["type"] == kind:
                        return message

            await until("hello")
            await socket.send_str("not json")
            await until("refused")
            await socket.send_json({"type": "publish", "topic": "plant/valve", "payload": "open"})
            await until("refused")
            await socket.send_json({"type": "ask", "question": "Hi", "conversation_id": "a/#"})
            await until("refused")
            # Fields the page may not choose are dropped: the service picks id and topics.
            await socket.send_json(
                {
                    "type": "ask",
                    "question": "What is MQTT?",
                    "conversation_id": "c-1",
                    "id": "chosen",
                    "topic": "plant/valve",
                    "max_tokens": 100000,
                }
            )
            await until("accepted")
            await socket.send_json({"type": "cancel", "id": "someone-else"})
            await asyncio.sleep(0.5)
        return received

    try:
        received = asyncio.run(session())
    finally:
        client.publish(f"{prefix}/status", "", retain=True)

    accepted = next(m for m in received if m["type"] == "accepted")
    refusals = [m for m in received if m["type"] == "refused"]
    assert [m["code"] for m in refusals] == ["invalid", "invalid", "invalid"]

    def published(received: list[Received]) -> list[Received]:
        return [r for r in received if not r.retain and r.topic != f"{prefix}/status"]

    # Stop, then the page going away, each cancel the page's own question.
    seen = published(client.wait_for(lambda r: len(published(r)) >= 3, timeout_s=10))
    assert [r.topic for r in seen] == [f"{prefix}/ask"] + [f"{prefix}/cancel"] * 2
    assert seen[0].json() == {
        "id": accepted["id"],
        "question": "What is MQTT?",
        "conversation_id": "c-1",
    }
    # Whatever id the page names.
    assert [r.json() for r in seen[1:]] == [{"id": accepted["id"]}] * 2


def test_pages_together_send_at_most_five_questions_a_second(
    web: WebFactory, config_path: Path, client: TestClient, prefix: str
) -> None:
    url = web(config_path).url
    client.subscribe(f"{prefix}/ask")
    client.publish(f"{prefix}/status", "online", retain=True)

    async def flood() -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as socket,
        ):
            replies: list[dict[str, Any]] = []
            while not replies or replies[-1]["type"] != "kiosk" or not replies[-1]["status"]:
                replies.append(json.loads(await socket.receive_str(timeout=10)))
            for _ in range(7):
                await socket.send_json({"type": "ask", "question": "Again?"})
            answers: list[dict[str, Any]] = []
            while len(answers) < 7:
                reply = json.loads(await socket.receive_str(timeout=10))
                if reply["type"] in ("accepted", "refused"):
                    answers.append(reply)
            return answers

    try:
        answers = asyncio.run(flood())
    finally:
        client.publish(f"{prefix}/status", "", retain=True)

    assert [a["type"] for a in answers] == ["accepted"] * 5 + ["refused"] * 2
    assert {a["code"] for a in answers[5:]} == {"busy"}
    assert all(0 < a["retry_after_s"] <= 1 for a in answers[5:])
    asks = client.wait_for(lambda received: len(received) >= 5, timeout_s=10)
    time.sleep(0.3)  # a sixth would have arrived by now
    assert len(client.on_topic(f"{prefix}/ask")) == len(asks) == 5


def test_a_broker_restart_shows_in_the_status_and_ends_the_open_question(
    web: WebFactory, own_broker: Broker, tmp_path: Path, prefix: str
) -> None:
    own_broker.start()
    config_path = tmp_path / "kioskd.yaml"
    mqtt = {"host": "127.0.0.1", "port": own_broker.port, "topic_prefix": prefix}
    config_path.write_text(yaml.safe_dump({"mqtt": mqtt}))
    url = web(config_path).url
    kiosk = TestClient(own_broker.port)
    kiosk.publish(f"{prefix}/status", "online", retain=True)
    kiosk.close()

    async def session() -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as socket,
        ):

            async def until(wanted: dict[str, Any]) -> None:
                while not (received and wanted.items() <= received[-1].items()):
                    try:
                        received.append(json.loads(await socket.receive_str(timeout=20)))
                    except TimeoutError:
                        raise AssertionError(f"no {wanted} in {received}") from None

            await until({"type": "kiosk", "status": "online"})
            await socket.send_json({"type": "ask", "question": "Are you there?"})
            await until({"type": "accepted"})
            await asyncio.to_thread(own_broker.stop)
            await until({"type": "kiosk", "broker": False, "status": None})
            await asyncio.to_thread(own_broker.start)
            await until({"type": "error", "code": "interrupted"})
        return received

    received = asyncio.run(session())

    accepted = next(m for m in received if m["type"] == "accepted")
    assert received[-1]["id"] == accepted["id"]
    assert received[-1]["message"] == "The connection to the kiosk was interrupted."
    down = next(i for i, m in enumerate(received) if m["type"] == "kiosk" and not m["broker"])
    assert [m["broker"] for m in received[down:] if m["type"] == "kiosk"] == [False, True]
