"""`kioskd bench fleet --kiosks 1,2,3`: questions per second of a fleet of 1, 2, 3... kiosks.

Each size runs on a private mosquitto with that many daemons sharing `$share/bench/F/ask`, and
the same burst of questions is published to F/ask at once; the figure is questions answered per
second, from the first publish to the last `done`. The token-delay test hook
(KIOSKD_TEST_TOKEN_DELAY_MS) makes every answer take a known time, as a board's decode speed
would, so the figure shows how the broker spreads the work, not how this machine's few cores
share llama.cpp between daemons (docs/benchmarks.md says what differs on real boards). Sizes
run in turn, repeated `reps` times, interleaved.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.bench.harness import IGNORE_EOS, progress, spawn, write_config
from daemon.bench.localbroker import LocalBroker, free_port
from daemon.bench.results import command_line
from daemon.broker import Connection
from daemon.packets import Inbound

_TOKEN_DELAY_MS = 250
_TOKENS = 6  # about 1.5 s an answer: the delay, not the CPU, sets the pace
_QUESTIONS_PER_KIOSK = 6


@dataclass(frozen=True)
class FleetResult:
    command: str
    token_delay_ms: int
    tokens: int
    questions: int
    questions_per_s: dict[str, list[float]]  # by fleet size
    questions_per_s_median: dict[str, float]
    scaling: dict[str, float]  # the median over the smallest size's
    taken: dict[str, list[dict[str, int]]]  # answers per device, every run


def run_fleet(*, kiosks: list[int], reps: int) -> FleetResult:
    """Every size in turn, `reps` times."""
    questions = _QUESTIONS_PER_KIOSK * max(kiosks)
    samples: dict[int, list[float]] = {size: [] for size in kiosks}
    spreads: dict[int, list[dict[str, int]]] = {size: [] for size in kiosks}
    for _rep in range(reps):
        for size in kiosks:
            per_s, spread = _one_run(size, questions=questions)
            samples[size].append(per_s)
            spreads[size].append(dict(spread))
            progress(f"{size} kiosk(s): {per_s:.2f} questions/s, taken {dict(spread)}")
    medians = {size: statistics.median(values) for size, values in samples.items()}
    base = medians[min(kiosks)]
    return FleetResult(
        command=command_line(),
        token_delay_ms=_TOKEN_DELAY_MS,
        tokens=_TOKENS,
        questions=questions,
        questions_per_s={str(k): v for k, v in samples.items()},
        questions_per_s_median={str(k): round(v, 3) for k, v in medians.items()},
        scaling={str(k): round(v / base, 2) for k, v in medians.items()},
        taken={str(k): v for k, v in spreads.items()},
    )


def _one_run(size: int, *, questions: int) -> tuple[float, Counter[str]]:
    with (
        tempfile.TemporaryDirectory(prefix="kioskd-bench-fleet-") as tmp,
        LocalBroker(free_port(), Path(tmp)) as broker,
    ):
        root = Path(tmp)
        daemons: list[subprocess.Popen[bytes]] = []
        try:
            fleet = f"bench-{uuid.uuid4().hex[:8]}/fleet"
            for index in range(size):
                daemons.append(_start_daemon(root, broker.port, fleet, index))
            done: dict[str, str] = {}
            all_done = threading.Event()
            lock = threading.Lock()

            def received(message: Inbound) -> None:
                body = json.loads(message.payload)
                if body.get("type") in ("done", "error"):
                    with lock:
                        done[body["id"]] = str(body.get("device"))
                        if len(done) == questions:
                            all_done.set()

            client = Connection(
                host="127.0.0.1",
                port=broker.port,
                client_id=f"bench-fleet-{uuid.uuid4().hex[:6]}",
                subscriptions=[f"{fleet}/answer/+"],
                on_message=received,
            )
            client.start()
            try:
                if not client.wait_connected(10):
                    raise RuntimeError("the bench client could not connect")
                _wait_members(root, size)
                started = time.monotonic()
                for index in range(questions):
                    client.publish(
                        f"{fleet}/ask",
                        json.dumps({"id": f"b{index}", "question": "Name a tool."}).encode(),
                    )
                if not all_done.wait(600):
                    raise TimeoutError(f"only {len(done)} of {questions} answered")
                elapsed_s = time.monotonic() - started
            finally:
                client.stop()
            return questions / elapsed_s, Counter(done.values())
        finally:
            for daemon in daemons:  # all at once: they stop in parallel
                daemon.terminate()
            for daemon in daemons:
                daemon.wait(30)


def _start_daemon(root: Path, port: int, fleet: str, index: int) -> subprocess.Popen[bytes]:
    name = f"k{index}"
    config: dict[str, Any] = {
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "topic_prefix": f"{fleet}-own/{name}",
            "device_id": name,
            "client_id": f"kioskd-bench-{name}-{uuid.uuid4().hex[:6]}",
        },
        "fleet": {"prefix": fleet, "group": "bench"},
        "model": {"max_tokens": _TOKENS, "threads": 1},
        "queue": {"capacity": 32},  # the broker's inflight window (20) holds back the rest
    }
    path = write_config(root, name, config)
    delay = {"KIOSKD_TEST_TOKEN_DELAY_MS": str(_TOKEN_DELAY_MS)}
    return spawn(root, name, ["run", "--config", str(path)], IGNORE_EOS | delay)


def _wait_members(root: Path, size: int) -> None:
    """Until every daemon says it joined the share (its log; the bench owns the daemons)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        logs = [(root / f"k{i}.log").read_text(errors="replace") for i in range(size)]
        if all("joined the fleet" in log for log in logs):
            return
        time.sleep(0.2)
    raise TimeoutError("the daemons did not join the fleet")
