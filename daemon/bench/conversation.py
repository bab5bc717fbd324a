"""`kioskd bench conversation`: what a conversation's saved model state is worth, and what it
costs.

1. Time to first token of turn 5 (about 1,000 tokens of history) when its saved state is
   restored after another question ran, against reading the whole history again, in one
   interleaved run on one engine (and back to back, with the state still in the KV cache).
   Also the restore and save time against the prefill time of the same tokens, and the bytes
   of state per token.
2. Many conversations of 3 turns through one daemon over MQTT: its RSS against its RSS after a
   single question, and the bytes of its conversation files, against conversations.max_state_mb.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemon import seqstate
from daemon.asker import ask
from daemon.bench.harness import (
    DaemonSpec,
    bench_engine,
    generate_silently,
    private_daemons,
    progress,
    rotated,
)
from daemon.bench.results import OMIT_IF_NONE, Machine, command_line, machine
from daemon.conversations import ConversationStore
from daemon.turns import Turns

# A turn of about 250 tokens: a long question (an operator pastes an alarm text) and an answer
# of ANSWER_TOKENS; four of them make the history of turn 5.
_ALARM = (
    "Alarm log from press {n}: hydraulic pressure dropped from 180 bar to 95 bar within two "
    "seconds while the ram was moving down; the light curtain was clear, the oil temperature "
    "read 61 C, the pump motor current rose to 14 A, and the operator heard a knocking noise "
    "from the valve block on the left side. The same alarm came twice yesterday on the late "
    "shift and once this morning after the tool change. What should I check first, and is it "
    "safe to run the press at reduced speed until maintenance arrives?"
)
QUESTIONS = [_ALARM.format(n=n) for n in range(1, 5)]
TURN_5 = "Summarise what we found so far in two sentences."
OTHER_QUESTION = "Where is the nearest first aid kit?"
ANSWER_TOKENS = 96
PREFIX = "bench/conversations"


@dataclass(frozen=True)
class Turn5Result:
    history_tokens: int
    turn5_prompt_tokens: int
    first_token_ms_median: dict[str, float]  # restored, back_to_back, reread
    cut_by_restore_percent: float
    cut_back_to_back_percent: float
    cached_tokens_median: dict[str, float]
    state_tokens: int
    state_bytes: int
    state_bytes_per_token: int
    restore_ms_median: float
    save_ms_median: float
    prefill_same_tokens_ms_median: float
    samples: dict[str, list[float]]


@dataclass(frozen=True)
class ManyResult:
    conversations: int
    turns: int
    max_state_mb: float
    max_active: int
    rss_single_question_mib: float
    rss_peak_mib: float
    rss_growth_mib: float
    rss_allowed_growth_mib: float
    files_peak_mib: float
    files_after_shutdown_mib: float
    follow_up_cached_tokens_median: float | None
    seconds: float


@dataclass(frozen=True)
class ConversationResult:
    command: str
    machine: Machine
    model: str  # the file's name
    turn5: Turn5Result
    many: ManyResult | None = field(default=None, metadata=OMIT_IF_NONE)  # --conversations 0


def _first_token_ms(turns: Turns, question: str, conversation: str | None) -> tuple[float, int]:
    """Time to the first token of a turn that is then stopped (so not remembered)."""
    checks = iter([False])
    started = time.monotonic()
    result = generate_silently(
        turns.generate,
        question,
        max_tokens=4,
        should_stop=lambda: next(checks, True),
        conversation_id=conversation,
    )
    if result.first_token_monotonic is None or not result.stopped:
        raise RuntimeError("the measured turn did not stop after its first token")
    return (result.first_token_monotonic - started) * 1000, result.cached_tokens


def _history(turns: Turns, conversation: str) -> None:
    for question in QUESTIONS:
        result = generate_silently(
            turns.generate, question, max_tokens=ANSWER_TOKENS, conversation_id=conversation
        )
        if result.stopped:
            raise RuntimeError("a history turn was cut short")


def run_turn5(*, reps: int, threads: int, model: Path) -> Turn5Result:
    """Turn 5's time to first token: restored state, back to back, and history read again."""
    engine = bench_engine(model, threads, max_tokens=256)  # answers of a known length
    budget = 2048 - 256
    with_state = ConversationStore(ttl_s=3600, max_active=4, max_state_bytes=1 << 30)
    text_only = ConversationStore(ttl_s=3600, max_active=4, max_state_bytes=0)
    reuse = Turns(engine, with_state, budget_tokens=budget, keep_state=True)
    reread = Turns(engine, text_only, budget_tokens=budget, keep_state=False)
    _history(reuse, "reuse")
    _history(reread, "reread")  # greedy: the same text, so the same history
    start = with_state.begin("reuse")
    with_state.finish(start, None)
    state = start.state
    if state is None:
        raise RuntimeError("no saved state for the conversation")
    turn5_tokens = len(engine.prompt_tokens(TURN_5, start.exchanges))
    history_tokens = turn5_tokens - len(engine.prompt_tokens(TURN_5))
    samples: dict[str, list[float]] = {"restored": [], "back_to_back": [], "reread": []}
    cached: dict[str, list[int]] = {name: [] for name in samples}
    restore_ms: list[float] = []
    prefill_ms: list[float] = []
    save_ms: list[float] = []
    for rep in range(reps):
        for mode in rotated(("restored", "back_to_back", "reread"), rep):
            if mode == "reread":
                engine.forget_prompt_cache()
                ms, reused = _first_token_ms(reread, TURN_5, "reread")
            else:
                if mode == "restored":
                    _first_token_ms(reuse, OTHER_QUESTION, None)  # the cache holds another prompt
                else:
                    _first_token_ms(reuse, TURN_5, "reuse")  # the cache holds this very turn
                ms, reused = _first_token_ms(reuse, TURN_5, "reuse")
            samples[mode].append(ms)
            cached[mode].append(reused)
        # The same tokens three ways: restored from the state, computed, and saved again.
        engine.forget_prompt_cache()
        restore_ms.append(_timed(seqstate.restore, engine._ctx, state))
        engine.forget_prompt_cache()  # the engine did not see that restore: start clean
        prefill_ms.append(_timed(engine._evaluate, list(state.tokens)))
        save_ms.append(_timed(engine.save_sequence, list(state.tokens)))
        progress(
            f"rep {rep + 1}/{reps}: turn 5 first token restored {samples['restored'][-1]:.0f} "
            f"ms, back to back {samples['back_to_back'][-1]:.0f} ms, history read again "
            f"{samples['reread'][-1]:.0f} ms; restore {restore_ms[-1]:.1f} ms, prefill "
            f"{prefill_ms[-1]:.0f} ms"
        )
    engine.close()
    median = {mode: statistics.median(values) for mode, values in samples.items()}
    return Turn5Result(
        history_tokens=history_tokens,
        turn5_prompt_tokens=turn5_tokens,
        first_token_ms_median={mode: round(value, 1) for mode, value in median.items()},
        cut_by_restore_percent=round(100 * (1 - median["restored"] / median["reread"]), 1),
        cut_back_to_back_percent=round(100 * (1 - median["back_to_back"] / median["reread"]), 1),
        cached_tokens_median={mode: statistics.median(v) for mode, v in cached.items()},
        state_tokens=len(state.tokens),
        state_bytes=state.nbytes,
        state_bytes_per_token=round(state.nbytes / len(state.tokens)),
        restore_ms_median=round(statistics.median(restore_ms), 2),
        save_ms_median=round(statistics.median(save_ms), 2),
        prefill_same_tokens_ms_median=round(statistics.median(prefill_ms), 1),
        samples=samples,
    )


def _timed(action: Callable[..., object], *args: Any) -> float:
    started = time.perf_counter()
    action(*args)
    return (time.perf_counter() - started) * 1000


# --- many conversations through one daemon ---------------------------------------------------


def _ask(
    port: int, question: str, conversation: str | None, timeout_s: float = 60
) -> dict[str, Any]:
    answer = ask(
        question,
        host="127.0.0.1",
        port=port,
        prefix=PREFIX,
        temperature=0.0,
        timeout_s=timeout_s,
        conversation_id=conversation,
    )
    return answer.final or {}


def _tree_bytes(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    total = 0
    for path in directory.iterdir():
        # The daemon writes each file as a temporary one and renames it: one may be gone by now.
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def run_many(
    *, conversations: int, threads: int, model: Path, max_state_mb: float, max_active: int
) -> ManyResult:
    """`conversations` conversations of 3 turns, 8 at a time, through one daemon: its RSS and
    its files against the single-question figure and max_state_mb."""
    with tempfile.TemporaryDirectory(prefix="kioskd-bench-conversations-") as tmp:
        files = Path(tmp)
        settings = {"max_state_mb": max_state_mb, "max_active": max_active, "dir": str(files)}
        spec = DaemonSpec(PREFIX, sections={"conversations": settings})
        with private_daemons([spec], model=model, threads=threads, max_tokens=16) as run:
            process = psutil.Process(run.processes[PREFIX].pid)
            port = run.port
            _ask(port, "What is a fuse?", None)
            single_mib = process.memory_info().rss / 2**20
            peak_mib, peak_disk, turns, cached, started = single_mib, 0, 0, [], time.monotonic()
            for group in range(0, conversations, 8):
                members = [f"c{number}" for number in range(group, min(group + 8, conversations))]
                for turn in range(3):
                    for conversation in members:
                        done = _ask(port, f"Turn {turn + 1} of {conversation}?", conversation)
                        if done.get("type") != "done":
                            raise RuntimeError(f"turn failed: {done}")
                        turns += 1
                        if turn > 0:
                            cached.append(done["usage"]["cached_tokens"])
                        peak_disk = max(peak_disk, _tree_bytes(files))
                peak_mib = max(peak_mib, process.memory_info().rss / 2**20)
                progress(
                    f"{group + len(members)}/{conversations} conversations: RSS "
                    f"{peak_mib:.1f} MiB (single question {single_mib:.1f}), files "
                    f"{peak_disk / 2**20:.2f} MiB"
                )
            elapsed_s = time.monotonic() - started
        after_stop_disk = _tree_bytes(files)
    return ManyResult(
        conversations=conversations,
        turns=turns,
        max_state_mb=max_state_mb,
        max_active=max_active,
        rss_single_question_mib=round(single_mib, 1),
        rss_peak_mib=round(peak_mib, 1),
        rss_growth_mib=round(peak_mib - single_mib, 1),
        rss_allowed_growth_mib=max_state_mb + 30,
        files_peak_mib=round(peak_disk / 2**20, 2),
        files_after_shutdown_mib=round(after_stop_disk / 2**20, 2),
        follow_up_cached_tokens_median=statistics.median(cached) if cached else None,
        seconds=round(elapsed_s, 1),
    )


def run_conversation(
    *,
    reps: int,
    threads: int,
    model: Path,
    conversations: int,
    max_state_mb: float,
) -> ConversationResult:
    """Both parts (the second unless conversations is 0)."""
    many = None
    turn5 = run_turn5(reps=reps, threads=threads, model=model)
    if conversations > 0:
        many = run_many(
            conversations=conversations,
            threads=threads,
            model=model,
            max_state_mb=max_state_mb,
            max_active=32,
        )
    return ConversationResult(command_line(), machine(), model.name, turn5, many)
