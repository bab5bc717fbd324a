"""Start-up order, the broker coming and going, and the clean stop of docs/protocol.md."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from daemon import exitcodes
from tests.support.daemon import Broker, DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed


def test_broker_that_starts_after_the_daemon(
    start_daemon: DaemonFactory, own_broker: Broker
) -> None:
    daemon = start_daemon(
        {"mqtt": {"reconnect_min_s": 1, "reconnect_max_s": 2}},
        port=own_broker.port,
        wait_online=False,
    )
    time.sleep(3)  # the daemon loads its model and keeps retrying the absent broker
    assert daemon.process.poll() is None, daemon.log()
    own_broker.start()
    client = TestClient(own_broker.port)
    try:
        client.subscribe(daemon.topic("status"))
        client.wait_status(daemon.topic("status"), b"online", timeout_s=30)
        client.subscribe(daemon.topic("answer/late"))
        client.publish(daemon.topic("ask"), {"id": "late", "question": "Hi.", "max_tokens": 5})
        messages = client.stream(daemon.topic("answer/late"))
        assert assert_well_formed(messages, "late")["type"] == "done"
    finally:
        client.close()


def test_sigterm_mid_answer_with_a_full_queue(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"shutdown": {"grace_s": 1}, "queue": {"capacity": 2}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/+"))
    client.subscribe(daemon.topic("status"))
    client.publish(daemon.topic("ask"), {"id": "running", "question": "x", "max_tokens": 500})
    client.wait_for(lambda got: any(r.topic.endswith("/running") for r in got))
    for request_id in ("queued-1", "queued-2"):
        client.publish(daemon.topic("ask"), {"id": request_id, "question": "x"})
    client.wait_for(lambda got: any(r.topic.endswith("/queued-2") for r in got))
    started = time.monotonic()
    rc = daemon.terminate(timeout_s=10)
    elapsed_s = time.monotonic() - started
    assert rc == exitcodes.OK, daemon.log()
    assert elapsed_s < 1 + 2, f"exit took {elapsed_s:.1f} s; grace is 1 s"
    for request_id in ("queued-1", "queued-2", "running"):
        messages = client.stream(daemon.topic(f"answer/{request_id}"), timeout_s=5)
        final = assert_well_formed(messages, request_id)
        assert final["type"] == "error"
        assert final["code"] == "shutting_down"
    client.wait_status(daemon.topic("status"), b"offline", timeout_s=5)
    late = TestClient(client_port(client))
    try:
        late.subscribe(daemon.topic("status"))
        retained = late.wait_for(bool, timeout_s=5)
        assert retained[0].payload == b"offline"
        assert retained[0].retain
    finally:
        late.close()


def client_port(client: TestClient) -> int:
    return int(client._client.port)


def test_running_answer_may_finish_within_grace(
    start_daemon: DaemonFactory, client: TestClient, slow_tokens: dict[str, str]
) -> None:
    daemon = start_daemon({"shutdown": {"grace_s": 10}}, env=slow_tokens)
    client.subscribe(daemon.topic("answer/short"))
    client.publish(daemon.topic("ask"), {"id": "short", "question": "x", "max_tokens": 25})
    client.wait_for(bool)
    assert daemon.terminate(timeout_s=15) == exitcodes.OK
    final = assert_well_formed(client.stream(daemon.topic("answer/short")), "short")
    assert final["type"] == "done"
    assert final["finish_reason"] == "length"


def test_question_sent_while_daemon_is_away_is_answered_on_return(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(name="first")
    assert daemon.terminate() == exitcodes.OK
    client.subscribe(daemon.topic("answer/meanwhile"))
    client.publish(daemon.topic("ask"), {"id": "meanwhile", "question": "Hi.", "max_tokens": 4})
    start_daemon(name="second")
    messages = client.stream(daemon.topic("answer/meanwhile"))
    assert assert_well_formed(messages, "meanwhile")["type"] == "done"


def test_missing_model_exits_with_the_no_restart_code(
    start_daemon: DaemonFactory, client: TestClient, prefix: str
) -> None:
    client.subscribe(f"{prefix}/error")
    daemon = start_daemon({"model": {"path": "/nonexistent/model.gguf"}}, wait_online=False)
    assert daemon.process.wait(60) == exitcodes.MODEL_UNAVAILABLE
    errors = client.wait_for(bool, timeout_s=10)
    reason = json.loads(errors[0].payload)
    assert reason["code"] == "model_error"
    assert "/nonexistent/model.gguf" in reason["message"]


def test_corrupt_model_exits_with_the_no_restart_code(
    start_daemon: DaemonFactory, tmp_path: object
) -> None:
    from pathlib import Path  # noqa: PLC0415

    bad = Path(str(tmp_path)) / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    daemon = start_daemon({"model": {"path": str(bad)}}, wait_online=False)
    assert daemon.process.wait(60) == exitcodes.MODEL_UNAVAILABLE, daemon.log()
    assert "cannot load model" in daemon.log()


def test_config_error_exits_78_and_says_why_on_the_broker(
    broker: Broker, client: TestClient, prefix: str, tmp_path: Path
) -> None:
    client.subscribe(f"{prefix}/error")
    client.subscribe(f"{prefix}/status")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"mqtt:\n  port: {broker.port}\n  topic_prefix: {prefix}\nqueue:\n  capasity: 3\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == exitcodes.CONFIG_ERROR
    received = client.wait_for(lambda got: len(got) >= 2, timeout_s=10)
    error = next(json.loads(r.payload) for r in received if r.topic.endswith("/error"))
    assert "queue.capasity: unknown key (did you mean queue.capacity?)" in error["message"]
    status = next(r for r in received if r.topic.endswith("/status"))
    assert status.payload == b"offline"


def test_duplicate_client_id_is_detected_and_reported(
    start_daemon: DaemonFactory, prefix: str
) -> None:
    shared = {
        "mqtt": {
            "client_id": f"{prefix.replace('/', '-')}-same",
            "reconnect_min_s": 1,
            "reconnect_max_s": 1,
        }
    }
    first = start_daemon(shared, name="first")
    second = start_daemon(
        {**shared, "mqtt": {**shared["mqtt"], "topic_prefix": f"{prefix}-b"}},
        name="second",
        wait_online=False,
    )
    deadline = time.monotonic() + 45
    reported = "most likely another client uses client id"
    while time.monotonic() < deadline and reported not in first.log() + second.log():
        time.sleep(0.5)
    assert reported in first.log() + second.log()
    assert first.process.poll() is None
    assert second.process.poll() is None


def test_sigterm_while_generation_is_hung_still_ends_the_answer_and_says_offline(
    start_daemon: DaemonFactory,
    client: TestClient,
    slow_tokens: dict[str, str],
    tmp_path: Path,
) -> None:
    stall = tmp_path / "stall"
    daemon = start_daemon(
        {"shutdown": {"grace_s": 1}},
        env={**slow_tokens, "KIOSKD_TEST_STALL_FILE": str(stall)},
    )
    client.subscribe(daemon.topic("answer/stuck"))
    client.subscribe(daemon.topic("status"))
    client.publish(daemon.topic("ask"), {"id": "stuck", "question": "x", "max_tokens": 500})
    client.wait_for(lambda got: any(r.topic.endswith("/stuck") for r in got))
    stall.touch()  # the worker stops between tokens and never looks at should_stop again
    started = time.monotonic()
    rc = daemon.terminate(timeout_s=20)
    elapsed_s = time.monotonic() - started
    # Within systemd's stop timeout (20 s in the unit): grace 1 s, then 5 s for the worker.
    assert rc == exitcodes.OK, daemon.log()
    assert elapsed_s < 1 + 5 + 3, f"exit took {elapsed_s:.1f} s"
    final = assert_well_formed(client.stream(daemon.topic("answer/stuck"), timeout_s=5), "stuck")
    assert final["type"] == "error"
    assert final["code"] == "shutting_down"
    client.wait_status(daemon.topic("status"), b"offline", timeout_s=5)
    assert "the generation thread is hung" in daemon.log()
