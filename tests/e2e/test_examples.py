"""The client examples in docs/examples, run for real against the real broker and daemon:
the Node-RED flow (node-red from npm, headless) and the MQTT.js snippet; the Home Assistant
package is checked for its shape, since Home Assistant itself is not installed here."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.daemon import REPO, Broker, DaemonFactory, free_port
from tests.support.mqtt_client import TestClient

EXAMPLES = REPO / "docs" / "examples"
# Pinned: node-red 5 needs Node.js 22, Debian 12 ships 18.
NPM_PACKAGES = ("node-red@4.1.8", "mqtt@5.16.0")
# The examples' placeholder prefix, replaced by the test's own.
EXAMPLE_PREFIX = "kiosk/line-3"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """node-red and mqtt from the npm registry, installed once into a cache kept between runs."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("npm and node are not installed (scripts/setup installs them)")
    cache = Path(os.environ.get("KIOSKD_TEST_CACHE", Path.home() / ".cache" / "kioskd-test"))
    target = cache / "npm-{}".format("-".join(NPM_PACKAGES).replace("@", "_"))
    if not (target / "node_modules" / "node-red" / "package.json").exists():
        # Into a fresh directory, then renamed: an interrupted install never looks complete.
        partial = cache / f"{target.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "package.json").write_text('{"private": true}\n')
        install = subprocess.run(
            [
                npm,
                "install",
                # No install scripts and no optional native parts: nothing is fetched from
                # anywhere but the registry, and nothing is compiled.
                "--ignore-scripts",
                "--omit=optional",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
                "--loglevel=error",
                *NPM_PACKAGES,
            ],
            check=False,
            cwd=partial,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if install.returncode != 0:
            pytest.fail(f"npm install {' '.join(NPM_PACKAGES)} failed:\n{install.stderr}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target / "node_modules"


@pytest.fixture
def watcher(broker: Broker, prefix: str) -> Iterator[TestClient]:
    """Another client on the broker: sees each question and its whole reply stream."""
    client = TestClient(broker.port)
    client.subscribe(f"{prefix}/ask")
    client.subscribe(f"{prefix}/answer/+")
    yield client
    client.close()


def example_flow(broker: Broker, prefix: str) -> list[dict[str, Any]]:
    """The shipped flow with the broker node and the topics pointed at this test's kiosk."""
    flow: list[dict[str, Any]] = json.loads((EXAMPLES / "node-red-flow.json").read_text())
    for node in flow:
        if node["type"] == "mqtt-broker":
            node["broker"], node["port"] = "127.0.0.1", str(broker.port)
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["topic"].startswith(f"{EXAMPLE_PREFIX}/")
            node["topic"] = prefix + node["topic"][len(EXAMPLE_PREFIX) :]
    return flow


@pytest.fixture
def node_red(node_modules: Path, broker: Broker, prefix: str, tmp_path: Path) -> Iterator[int]:
    """Node-RED, headless on a free loopback port, running the example flow; yields the port."""
    user_dir = tmp_path / "node-red"
    user_dir.mkdir()
    (user_dir / "flows.json").write_text(json.dumps(example_flow(broker, prefix)))
    port = free_port()
    # No editor, no telemetry, no palette installs: nothing but the flow, on loopback.
    (user_dir / "settings.js").write_text(
        "module.exports = {\n"
        f'  uiHost: "127.0.0.1", uiPort: {port}, httpAdminRoot: false, flowFile: "flows.json",\n'
        '  credentialSecret: false, logging: { console: { level: "info" } },\n'
        "  telemetry: { enabled: false }, diagnostics: { enabled: false },\n"
        "  externalModules: { autoInstall: false, palette: { allowInstall: false } },\n"
        "};\n"
    )
    log_path = tmp_path / "node-red.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(shutil.which("node")),
                str(node_modules / "node-red" / "red.js"),
                "--settings",
                str(user_dir / "settings.js"),
                "--userDir",
                str(user_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Connected to broker" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Node-RED did not connect to the broker:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def post(port: int, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    """POST /ask to the flow's http-in endpoint; the status and the JSON it answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/ask", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_node_red_flow_answers_a_question_over_http(
    start_daemon: DaemonFactory, prefix: str, node_red: int, watcher: TestClient
) -> None:
    start_daemon({"model": {"max_tokens": 16}})
    status, body = post(
        node_red, json.dumps({"question": "Name a colour."}).encode(), "application/json"
    )
    assert status == 200, body
    asked = [r.json() for r in watcher.on_topic(f"{prefix}/ask")]
    assert asked == [{"id": body["id"], "question": "Name a colour.", "stream": False}]
    final = watcher.stream(f"{prefix}/answer/{body['id']}")[-1]
    assert final["type"] == "done"
    assert body["answer"] == final["text"] != ""
    assert body["finish_reason"] == final["finish_reason"]

    status, body = post(node_red, b"Plain text works too.", "text/plain")
    assert status == 200
    assert body["answer"] == watcher.stream(f"{prefix}/answer/{body['id']}")[-1]["text"]

    status, body = post(node_red, b"{}", "application/json")
    assert status == 400
    assert "question" in body["error"]


def test_mqtt_js_snippet_prints_the_streamed_answer(
    start_daemon: DaemonFactory,
    broker: Broker,
    prefix: str,
    node_modules: Path,
    watcher: TestClient,
    tmp_path: Path,
) -> None:
    start_daemon({"model": {"max_tokens": 16}})
    # Beside a node_modules, as a user runs it after `npm install mqtt`.
    shutil.copy(EXAMPLES / "mqtt-ask.mjs", tmp_path)
    (tmp_path / "node_modules").symlink_to(node_modules)
    env = {**os.environ, "KIOSK_URL": f"mqtt://127.0.0.1:{broker.port}", "KIOSK_PREFIX": prefix}
    run = subprocess.run(
        [str(shutil.which("node")), "mqtt-ask.mjs", "Name a colour."],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    request_id = next(r.json()["id"] for r in watcher.on_topic(f"{prefix}/ask"))
    final = watcher.stream(f"{prefix}/answer/{request_id}")[-1]
    assert final["type"] == "done"
    assert run.stdout == final["text"] + "\n"

    refused = subprocess.run(
        [str(shutil.which("node")), "mqtt-ask.mjs", "Hi"],
        check=False,
        cwd=tmp_path,
        env={**env, "KIOSK_URL": f"mqtt://127.0.0.1:{free_port()}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 69
    assert "ECONNREFUSED" in refused.stderr


def test_home_assistant_example_asks_and_waits_on_one_prefix() -> None:
    package = yaml.safe_load((EXAMPLES / "home-assistant.yaml").read_text())
    branches = package["script"]["ask_kiosk"]["sequence"][0]["parallel"]
    wait = branches[0]["sequence"][0]["wait_for_trigger"][0]
    publish = branches[1]["sequence"][-1]
    assert publish["action"] == "mqtt.publish"
    assert publish["data"]["topic"] == f"{EXAMPLE_PREFIX}/ask"
    assert "'stream': false" in publish["data"]["payload"]
    assert "'id': request_id" in publish["data"]["payload"]
    assert wait["topic"] == f"{EXAMPLE_PREFIX}/answer/{{{{ request_id }}}}"
    assert package["automation"][0]["actions"][0]["action"] == "script.ask_kiosk"
