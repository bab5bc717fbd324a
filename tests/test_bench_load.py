"""Smoke tests of `kioskd bench --contention` and `--chunking`: tiny runs, JSON, invariants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.bench_load import cpu_hogs
from tests.conftest import REPO


def _bench(tmp_path: Path, model_path: Path, *args: str, env: dict[str, str]) -> None:
    # The bench starts its own broker and daemons; a fetched production model must not be used.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "daemon", "bench", "--reps", "1", "--tokens", "8"),
            *("--model", str(model_path), "--out", str(tmp_path), *args),
        ],
        cwd=REPO,
        env={**_without_openmp(os.environ), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _without_openmp(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(("OMP_", "GOMP_"))}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_chunking_counts_messages_and_keeps_the_text(tmp_path: Path, model_path: Path) -> None:
    _bench(tmp_path, model_path, "--chunking", "--flush-ms", "0,200", env={})
    result = _load(tmp_path / "bench-chunking.json")

    assert result["flushes_ms"] == [0.0, 200.0]
    assert set(result["summary"]) == {"0", "200"}
    by_flush = {sample["flush_ms"]: sample for sample in result["samples"]}
    assert set(by_flush) == {0.0, 200.0}
    for sample in by_flush.values():
        assert sample["text_matches"]
        assert sample["completion_tokens"] == 8
        assert sample["all_messages"] == sample["chunk_messages"] + 1  # the chunks and the done
        # ChunkBuffer sends only non-empty token texts, so never more chunks than tokens.
        assert 1 <= sample["chunk_messages"] <= 8
        assert sample["tokens_per_chunk"] >= 1
        assert sample["first_chunk_ms"] > 0
        assert sample["end_to_end_tokens_per_s"] > 0
    # The same answer (temperature 0), gathered for 200 ms, cannot take more chunks than per token.
    assert by_flush[200.0]["chunk_messages"] <= by_flush[0.0]["chunk_messages"]
    assert all(row["text_mismatches"] == 0 for row in result["summary"].values())


def test_contention_measures_every_cell(tmp_path: Path, model_path: Path) -> None:
    # Settings in the caller's shell must not reach the "default" variant.
    caller = {"GOMP_SPINCOUNT": "12345", "OMP_WAIT_POLICY": "ACTIVE"}
    _bench(tmp_path, model_path, "--contention", "--hogs", "1", env=caller)
    result = _load(tmp_path / "bench-contention.json")

    assert result["hogs"] == 1
    assert result["threads"] == os.cpu_count()
    cells = sorted((s["variant"], s["load"]) for s in result["samples"])
    assert cells == [
        ("default", "loaded"),
        ("default", "quiet"),
        ("passive", "loaded"),
        ("passive", "quiet"),
    ]
    assert all(s["decode_tokens_per_s"] > 0 for s in result["samples"])
    assert result["daemon_openmp"]["default"]["env"] == {}
    assert result["daemon_openmp"]["passive"]["env"] == {
        "GOMP_SPINCOUNT": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    for variant in ("default", "passive"):
        row = result["summary"][variant]
        assert row["quiet_tokens_per_s_median"] > 0
        assert row["loaded_tokens_per_s_median"] > 0
        assert row["loaded_over_quiet"] > 0
    assert set(result["summary"]["passive_over_default_loaded"]) == {
        "ratio_of_medians",
        "ratio_median_of_pairs",
    }


def test_cpu_hogs_are_killed_when_the_measurement_fails() -> None:
    started: list[subprocess.Popen[bytes]] = []

    def measure() -> None:
        with cpu_hogs(2) as hogs:
            started.extend(hogs)
            assert all(hog.poll() is None for hog in hogs)
            raise RuntimeError("the question failed")

    with pytest.raises(RuntimeError):
        measure()
    assert len(started) == 2
    assert all(hog.returncode is not None for hog in started)
