"""The alternative kioskd is measured against: llama_cpp.server (HTTP + SSE) and an MQTT bridge.

The bridge is what a user would write today: subscribe to an ask topic, POST the prompt to
/v1/completions with stream=true, and forward every SSE delta as one MQTT chunk message in
kioskd's format, so the same client code measures both. It needs the `server` extra of
llama-cpp-python (`pip install 'llama-cpp-python[server]'`).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.bench.localbroker import free_port
from daemon.broker import Connection
from daemon.engine import Engine
from daemon.packets import Inbound
from daemon.topics import Topics

BRIDGE_PREFIX = "bench/bridge"


@contextmanager
def llama_server(workdir: Path, model: Path, threads: int) -> Iterator[tuple[int, int]]:
    """`python -m llama_cpp.server` on a free loopback port, same model and threads.

    Yields its port and process id.
    """
    port = free_port()
    log = (workdir / "llama-server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"llama_cpp.server did not start; see {workdir}/llama-server.log")
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


class Bridge:
    """MQTT ask topic -> llama_cpp.server /v1/completions (SSE) -> MQTT chunk messages."""

    def __init__(self, *, mqtt_port: int, server_port: int, engine: Engine) -> None:
        self._server_port = server_port
        self._engine = engine
        self._topics = Topics(BRIDGE_PREFIX)
        self._connection = Connection(
            host="127.0.0.1",
            port=mqtt_port,
            client_id="bench-bridge",
            subscriptions=[self._topics.ask],
            on_message=self._on_message,
        )

    def __enter__(self) -> Bridge:
        self._connection.start()
        if not self._connection.wait_connected(10):
            raise RuntimeError("the bridge could not connect to the broker")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._connection.stop()

    def _on_message(self, message: Inbound) -> None:
        # One worker thread per question, as a simple bridge would; the benchmark asks serially.
        threading.Thread(
            target=self._answer, args=(json.loads(message.payload),), daemon=True
        ).start()

    def _answer(self, request: dict[str, object]) -> None:
        request_id = str(request["id"])
        topic = self._topics.answer(request_id)
        prompt = self._engine.prompt_text(str(request["question"]))
        body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": request.get("max_tokens", 256),
                "temperature": request.get("temperature", 0.0),
                "stream": True,
            }
        )
        conn = http.client.HTTPConnection("127.0.0.1", self._server_port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        seq, events, text = 0, 0, []
        for line in response:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            piece = json.loads(data)["choices"][0]["text"]
            events += 1
            text.append(piece)
            chunk = {"id": request_id, "seq": seq, "type": "chunk", "text": piece}
            self._connection.publish(topic, json.dumps(chunk).encode())
            seq += 1
        done = {
            "id": request_id,
            "seq": seq,
            "type": "done",
            "text": "".join(text),
            "finish_reason": "length",
            "usage": {"prompt_tokens": 0, "completion_tokens": events},
            "timing": {
                "queued_ms": 0.0,
                "first_token_ms": None,
                "total_ms": 0.0,
                "tokens_per_s": None,
            },
        }
        self._connection.publish(topic, json.dumps(done).encode())
