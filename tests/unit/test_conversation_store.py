"""The conversation table and its files, without a broker or a model: expiry, bounds, forget,
and saved files that are stale, foreign or damaged."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from daemon.conversations import ConversationStore
from daemon.seqstate import SavedState, blank
from daemon.statefile import Identity, Prepared, Record, StateFiles

IDENTITY = Identity(
    model="1234:5678:abc", ctx=2048, template_sha256="t", system_prompt_sha256="s", llama="0.3"
)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


def _state(tokens: int, nbytes: int, fill: int = 7) -> SavedState:
    data = blank(nbytes)
    data.write(bytes([fill]) * nbytes)
    return SavedState(tuple(range(tokens)), data)


def _store(clock: Clock, files: StateFiles | None = None, **limits: int) -> ConversationStore:
    settings = {"ttl_s": 300, "max_active": 32, "max_state_bytes": 1 << 20} | limits
    store = ConversationStore(
        ttl_s=settings["ttl_s"],
        max_active=settings["max_active"],
        max_state_bytes=settings["max_state_bytes"],
        clock=clock,
    )
    if files is not None:
        store.load(files)
    return store


def _turn(
    store: ConversationStore, conversation_id: str, question: str, state: SavedState | None = None
) -> None:
    start = store.begin(conversation_id)
    store.finish(start, (question, f"answer to {question}"), state=state)


def test_turns_are_remembered_in_order_and_numbered() -> None:
    store = _store(Clock())
    first = store.begin("c1")
    assert (first.new, first.turns, first.exchanges) == (True, 0, ())
    store.finish(first, ("q1", "a1"))
    second = store.begin("c1")
    assert (second.new, second.turns, second.exchanges) == (False, 1, (("q1", "a1"),))
    assert second.info(context_tokens=12, dropped_now=0).turn == 2


def test_a_turn_not_remembered_leaves_its_number_to_the_next() -> None:
    store = _store(Clock())
    _turn(store, "c1", "q1")
    cancelled = store.begin("c1")
    store.finish(cancelled, None)
    assert store.next_turn("c1").turn == 2
    assert store.begin("c1").turns == 1
    # A first turn that is not remembered starts nothing: the next one is new again.
    store.finish(store.begin("c2"), None)
    assert store.next_turn("c2").new


def test_dropping_turns_for_the_budget_is_counted_and_kept() -> None:
    store = _store(Clock())
    for question in ("q1", "q2", "q3"):
        _turn(store, "c1", question)
    start = store.begin("c1")
    store.finish(start, ("q4", "a4"), dropped=2)
    after = store.begin("c1")
    assert [q for q, _ in after.exchanges] == ["q3", "q4"]
    assert (after.turns, after.dropped_turns) == (4, 2)


def test_conversations_expire_on_the_wall_clock() -> None:
    clock = Clock()
    store = _store(clock, ttl_s=60)
    _turn(store, "c1", "q1")
    clock.now_s += 59
    assert not store.next_turn("c1").new
    clock.now_s += 1
    assert store.next_turn("c1").new
    assert store.active == 0


def test_the_sweep_drops_expired_ones_but_not_one_with_a_turn_running() -> None:
    clock = Clock()
    store = _store(clock, ttl_s=60)
    _turn(store, "c1", "q1")
    _turn(store, "c2", "q1")
    running = store.begin("c2")
    clock.now_s += 61
    assert store.expire() == 1
    store.finish(running, ("q2", "a2"))
    assert store.begin("c2").turns == 2


def test_beyond_max_active_the_least_recently_used_goes() -> None:
    store = _store(Clock(), max_active=2)
    _turn(store, "a", "q")
    _turn(store, "b", "q")
    _turn(store, "a", "q2")  # a is now the most recently used
    _turn(store, "c", "q")
    assert store.active == 2
    assert store.next_turn("b").new
    assert not store.next_turn("a").new
    assert not store.next_turn("c").new


def test_saved_states_stay_within_their_byte_budget() -> None:
    store = _store(Clock(), max_state_bytes=10_000)
    _turn(store, "a", "q", _state(10, 4000))
    _turn(store, "b", "q", _state(10, 4000))
    _turn(store, "c", "q", _state(10, 4000))
    assert store.state_bytes == 8000
    assert store.begin("a").state is None  # the oldest state went; its text stays
    assert store.begin("a").exchanges
    assert store.begin("c").state is not None
    # One state bigger than the whole budget is not kept at all.
    _turn(store, "d", "q", _state(10, 20_000))
    assert store.state_bytes <= 10_000
    assert store.begin("d").state is None


def test_forget_drops_at_once_even_a_running_turn() -> None:
    store = _store(Clock())
    _turn(store, "c1", "q1", _state(4, 100))
    running = store.begin("c1")
    assert store.forget("c1")
    store.finish(running, ("q2", "a2"), state=_state(8, 200))
    assert store.next_turn("c1").new
    assert store.state_bytes == 0
    assert not store.forget("c1")


def test_conversations_come_back_from_their_files(tmp_path: Path) -> None:
    clock = Clock()
    files = StateFiles(tmp_path, IDENTITY)
    store = _store(clock, files)
    state = _state(5, 3000, fill=9)
    _turn(store, "c1", "q1", state)
    _turn(store, "c.2", "q1")
    assert store.save() == 2
    assert store.save() == 0  # nothing changed since
    assert {p.name for p in tmp_path.iterdir()} == {"c1.json", "c1.state", "c.2.json"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.iterdir())

    again = _store(clock, StateFiles(tmp_path, IDENTITY))
    assert again.active == 2
    start = again.begin("c1")
    assert start.exchanges == (("q1", "answer to q1"),)
    assert start.state is not None
    assert start.state.tokens == state.tokens
    assert start.state.data[:] == state.data[:]


def test_forget_and_expiry_delete_the_files(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(clock, StateFiles(tmp_path, IDENTITY), ttl_s=60)
    _turn(store, "gone", "q", _state(5, 100))
    _turn(store, "old", "q", _state(5, 100))
    store.save()
    store.forget("gone")
    assert not list(tmp_path.glob("gone.*"))
    clock.now_s += 61
    store.expire()
    assert not list(tmp_path.iterdir())


def test_expired_files_are_deleted_at_start(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(clock, StateFiles(tmp_path, IDENTITY), ttl_s=60)
    _turn(store, "c1", "q", _state(5, 100))
    store.save()
    clock.now_s += 3600  # kioskd was down for an hour
    assert _store(clock, StateFiles(tmp_path, IDENTITY), ttl_s=60).active == 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("change", "logged"),
    [
        ({"model": "999:1:def"}, "another setup (model file changed)"),
        ({"ctx": 4096}, "another setup (model.ctx changed)"),
        ({"system_prompt_sha256": "other"}, "another setup (model.system_prompt changed)"),
        ({"template_sha256": "other"}, "another setup (chat template changed)"),
        ({"llama": "0.4"}, "another setup (llama.cpp version changed)"),
    ],
)
def test_a_state_of_another_setup_is_refused_and_the_text_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict[str, object], logged: str
) -> None:
    clock = Clock()
    store = _store(clock, StateFiles(tmp_path, IDENTITY))
    _turn(store, "c1", "q1", _state(5, 100))
    store.save()
    with caplog.at_level(logging.WARNING):
        again = _store(clock, StateFiles(tmp_path, dataclasses.replace(IDENTITY, **change)))
    start = again.begin("c1")
    assert start.exchanges == (("q1", "answer to q1"),)
    assert start.state is None
    assert logged in caplog.text
    assert not (tmp_path / "c1.state").exists()


def test_a_truncated_or_altered_state_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = _store(clock, StateFiles(tmp_path, IDENTITY))
    _turn(store, "short", "q", _state(5, 1000))
    _turn(store, "flipped", "q", _state(5, 1000))
    store.save()
    short = tmp_path / "short.state"
    short.write_bytes(short.read_bytes()[:500])
    flipped = tmp_path / "flipped.state"
    flipped.write_bytes(b"\x00" + flipped.read_bytes()[1:])
    with caplog.at_level(logging.WARNING):
        again = _store(clock, StateFiles(tmp_path, IDENTITY))
    for conversation_id in ("short", "flipped"):
        start = again.begin(conversation_id)
        assert start.state is None
        assert start.exchanges == (("q", "answer to q"),)
    assert "truncated (500 of 1000 bytes)" in caplog.text
    assert "corrupt" in caplog.text


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"{not json",
        json.dumps({"format": 1, "id": "other"}).encode(),
        json.dumps({"format": 1, "id": "c1", "exchanges": [["q"]]}).encode(),
    ],
)
def test_an_unreadable_conversation_file_is_skipped_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    clock = Clock()
    store = _store(clock, StateFiles(tmp_path, IDENTITY))
    _turn(store, "c1", "q", _state(5, 100))
    _turn(store, "c2", "q")
    store.save()
    (tmp_path / "c1.json").write_bytes(damage)
    (tmp_path / "c1.json.tmp-0badf00d").write_bytes(b"left by a crash")
    with caplog.at_level(logging.WARNING):
        again = _store(clock, StateFiles(tmp_path, IDENTITY))
    assert again.active == 1
    assert again.next_turn("c1").new
    assert "skipped the saved conversation" in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {"c2.json"}


class MeasuredFiles(StateFiles):
    """StateFiles that note the bytes of state on disk when a new one has just been written:
    the fullest the directory gets."""

    peak_state_bytes = 0

    def prepare(self, record: Record, *, state_on_disk: SavedState | None) -> Prepared:
        prepared = super().prepare(record, state_on_disk=state_on_disk)
        on_disk = sum(p.stat().st_size for p in self.directory.glob("*.state*"))
        self.peak_state_bytes = max(self.peak_state_bytes, on_disk)
        return prepared


def test_files_on_disk_keep_to_the_state_budget(tmp_path: Path) -> None:
    clock = Clock()
    files = MeasuredFiles(tmp_path, IDENTITY)
    store = _store(clock, files, max_state_bytes=50_000, max_active=100)
    for number in range(40):
        # Conversations grow: each new state replaces a smaller one on disk.
        _turn(store, f"c{number % 6}", "q", _state(5, 6_000 + 100 * number))
        if number % 3 == 0:
            store.save()
    store.save()
    assert files.peak_state_bytes > 40_000, "the budget was reached"
    assert files.peak_state_bytes <= 50_000
    assert sum(p.stat().st_size for p in tmp_path.glob("*.state")) <= 50_000
    assert store.state_bytes <= 50_000
    assert store.active == 6


def test_a_directory_that_cannot_be_written_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the directory should be")
    store = _store(Clock(), StateFiles(blocked, IDENTITY))
    _turn(store, "c1", "q1", _state(5, 100))
    with caplog.at_level(logging.ERROR):
        store.save()
    assert "cannot save conversation c1" in caplog.text
    assert not store.next_turn("c1").new, "it goes on in memory"
