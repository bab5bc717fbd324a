"""What the hostile probe found beside crashes: a full disk, retained questions, a byte order
mark, cancel floods and a queue that outgrows the broker's inflight window."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, Broker, DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(params=["size=8m", "ro"], ids=["full", "read-only"])
def unwritable_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A cache directory on a tmpfs too small for the 242 MB model, or mounted read-only."""
    where = tmp_path / "cache"
    if not _mount_tmpfs(where, str(request.param)):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); this run has not got it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_unwritable_cache_exits_66_reports_and_leaves_no_partial_file(
    start_daemon: DaemonFactory, client: TestClient, prefix: str, unwritable_cache: Path
) -> None:
    client.subscribe(f"{prefix}/error")
    daemon = start_daemon(env={"XDG_CACHE_HOME": str(unwritable_cache)}, wait_online=False)
    assert daemon.process.wait(120) == 66, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log
    assert "cannot write the embedded model" in log
    report = client.wait_for(bool, timeout_s=10)[0].json()
    assert report["code"] == "model_error"
    assert "cannot write the embedded model" in report["message"]
    assert not list(unwritable_cache.rglob("*.partial")), "the disk is not left full"


def test_retained_question_gets_an_error_instead_of_silence(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon()
    client.subscribe(daemon.topic("answer/kept"))
    # Retained and published before the kiosk subscribes again: delivered with retain set.
    client.publish(daemon.topic("ask"), {"id": "kept", "question": "hi"}, retain=True)
    live = client.stream(daemon.topic("answer/kept"))
    try:
        assert assert_well_formed(live, "kept")["type"] == "done", "asked live, answered"
        daemon.terminate()
        count = len(client.received)
        restarted = start_daemon({"mqtt": {"client_id": "kioskd-retained-probe"}}, name="restarted")
        error = client.wait_for(lambda got: len(got) > count, timeout_s=30)[count:]
        refusal = assert_well_formed([r.json() for r in error][:1], "kept")
        assert refusal["code"] == "invalid_request"
        assert refusal["message"].startswith("retain:")
        assert "refused a retained question" in restarted.log()
    finally:
        client.publish(daemon.topic("ask"), b"", retain=True)


def test_json_with_a_byte_order_mark_is_read_as_json(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 3}})
    client.subscribe(daemon.topic("answer/bom"))
    payload = b"\xef\xbb\xbf" + json.dumps({"id": "bom", "question": "hi"}).encode()
    client.publish(daemon.topic("ask"), payload)
    assert assert_well_formed(client.stream(daemon.topic("answer/bom")), "bom")["type"] == "done"


def test_a_cancel_flood_writes_a_bounded_log(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon({"model": {"max_tokens": 3}})
    for index in range(300):
        client.publish(daemon.topic("cancel"), {"id": f"nobody-{index}"}, qos=0)
    client.subscribe(daemon.topic("answer/after"))
    client.publish(daemon.topic("ask"), {"id": "after", "question": "hi"})
    assert_well_formed(client.stream(daemon.topic("answer/after")), "after")
    for index in range(300, 303):
        client.publish(daemon.topic("cancel"), {"id": f"nobody-{index}"})
    lines = [line for line in daemon.log().splitlines() if "cancel for unknown" in line]
    assert 1 <= len(lines) <= 20, f"{len(lines)} lines for 303 unknown cancels"


def test_check_config_warns_when_the_queue_outgrows_the_inflight_window(
    tmp_path: Path, broker: Broker
) -> None:
    config = tmp_path / "kioskd.yaml"
    config.write_text("queue:\n  capacity: 19\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, "a warning, not an error"
    assert "queue.capacity" in result.stderr
    assert "mqtt.broker_inflight_limit" in result.stderr
