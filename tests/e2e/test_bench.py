"""Smoke test of `kioskd bench compare` (raw loop against the daemon): a tiny run, its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import REPO


@pytest.mark.slow
def test_bench_measures_both_systems_and_writes_its_figures(
    tmp_path: Path, model_path: Path
) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "daemon", "bench", "compare", "--reps", "2", "--tokens", "4,8"),
            *("--idle-s", "0.5", "--model", str(model_path), "--out", str(tmp_path)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kioskd RSS" in result.stdout

    figures = json.loads((tmp_path / "bench.json").read_text())
    samples = figures["samples"]
    # Two systems x two lengths x two repetitions, each answer exactly as long as asked.
    assert sorted((s["system"], s["tokens"]) for s in samples) == sorted(
        [(system, n) for system in ("raw", "kioskd") for n in (4, 8)] * 2
    )
    for sample in samples:
        assert sample["decode_tokens_per_s"] > 0
        assert sample["gap_p99_ms"] > 0
        if sample["system"] == "kioskd":
            # The client's first chunk can only come after the model's first token.
            assert sample["first_token_ms"] > sample["model_first_token_ms"] > 0
            assert sample["first_chunk_overhead_ms"] > 0
    for length in ("4", "8"):
        row = figures["summary"][length]
        assert row["ratio_kioskd_over_raw"] > 0
        assert "server_decode_tokens_per_s" not in row  # only with `kioskd bench server`
    model_mib = model_path.stat().st_size / 2**20
    assert figures["kioskd_rss_mib"] > model_mib / 2  # the weights are in memory
    # A 2000-character prompt touches scratch memory that the short questions did not.
    assert figures["kioskd_rss_after_longest_question_mib"] > figures["kioskd_rss_mib"]
    assert figures["rss_budget_mib"] > model_mib + 95
    assert figures["kioskd_idle_cpu_percent_of_one_core"] >= 0
    assert figures["server_rss_mib"] is None
    assert figures["first_chunk_all_lengths"] is None  # kioskd against the server only
