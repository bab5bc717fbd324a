"""Conversations in memory: their remembered turns, expiry, how many are kept, and the memory
their saved model states may take (docs/protocol.md, "Conversations").

The worker thread starts and ends turns; P/forget arrives on the network thread; the saver
thread writes to disk. One lock guards the table, and every file rename or deletion happens
under it, so that a conversation forgotten while it is being saved never comes back from disk.
Writing the bytes happens outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.messages import ConversationInfo
from daemon.seqstate import SavedState
from daemon.statefile import Record, StateFiles

log = logging.getLogger(__name__)

Exchange = tuple[str, str]  # one remembered turn: (question, answer)


@dataclass
class _Conversation:
    id: str
    exchanges: tuple[Exchange, ...]  # the turns kept, oldest first
    turns: int  # turns remembered so far, dropped ones included
    dropped_turns: int
    last_used_s: float  # wall clock of its last answer
    state: SavedState | None = None
    version: int = 0  # bumped at every change, so that the saver knows what is new
    saved_version: int = -1  # the version on disk
    state_on_disk: SavedState | None = None

    def record(self) -> Record:
        return Record(
            self.id, self.exchanges, self.turns, self.dropped_turns, self.last_used_s, self.state
        )


@dataclass
class TurnStart:
    """What a turn starts from, read once when the turn starts."""

    conversation_id: str
    exchanges: tuple[Exchange, ...]
    turns: int
    dropped_turns: int
    state: SavedState | None
    new: bool
    forgotten: bool = field(default=False)  # P/forget came while the turn ran

    def info(self, *, context_tokens: int, dropped_now: int) -> ConversationInfo:
        return ConversationInfo(
            self.conversation_id,
            self.turns + 1,
            context_tokens,
            self.dropped_turns + dropped_now,
            self.new,
        )


class ConversationStore:
    """Every conversation kioskd remembers, bounded in number, age and state memory."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_active: int,
        max_state_bytes: int,
        files: StateFiles | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`files`: where conversations are saved (None: kept in memory only)."""
        self._ttl_s = ttl_s
        self._max_active = max_active
        self._max_state_bytes = max_state_bytes
        self._files = files
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently used first.
        self._table: OrderedDict[str, _Conversation] = OrderedDict()
        self._running: dict[str, TurnStart] = {}
        self._state_bytes = 0

    # --- turns (worker thread) -------------------------------------------------------------

    def begin(self, conversation_id: str) -> TurnStart:
        """The history a new turn of `conversation_id` continues (none for a new one)."""
        with self._lock:
            conversation = self._live(conversation_id)
            if conversation is None:
                start = TurnStart(conversation_id, (), 0, 0, None, new=True)
            else:
                start = TurnStart(
                    conversation_id,
                    conversation.exchanges,
                    conversation.turns,
                    conversation.dropped_turns,
                    conversation.state,
                    new=False,
                )
            self._running[conversation_id] = start
            return start

    def finish(
        self,
        start: TurnStart,
        exchange: Exchange | None,
        *,
        dropped: int = 0,
        state: SavedState | None = None,
    ) -> None:
        """End a turn: with `exchange`, remember it after the turns kept (`dropped` of the
        oldest cut for the budget), with `state` as the model state of them all."""
        with self._lock:
            if self._running.get(start.conversation_id) is start:
                del self._running[start.conversation_id]
            if exchange is None or start.forgotten:
                return
            conversation = self._table.get(start.conversation_id)
            if conversation is None:
                conversation = _Conversation(start.conversation_id, (), 0, 0, 0.0)
                self._table[start.conversation_id] = conversation
            conversation.exchanges = (*start.exchanges[dropped:], exchange)
            conversation.turns = start.turns + 1
            conversation.dropped_turns = start.dropped_turns + dropped
            conversation.last_used_s = self._clock()
            conversation.version += 1
            self._table.move_to_end(conversation.id)
            self._set_state(conversation, state)
            while len(self._table) > self._max_active:
                oldest = next(iter(self._table))
                log.info(
                    "conversation %s dropped: more than conversations.max_active (%d)",
                    oldest,
                    self._max_active,
                )
                self._drop(oldest)
            self._fit_states(keep=conversation)

    def next_turn(self, conversation_id: str) -> ConversationInfo:
        """Where a turn that ends before reaching the model would stand."""
        with self._lock:
            conversation = self._live(conversation_id)
            if conversation is None:
                return ConversationInfo(conversation_id, 1, 0, 0, new=True)
            return ConversationInfo(
                conversation_id, conversation.turns + 1, 0, conversation.dropped_turns, new=False
            )

    # --- forget, expiry, bounds ------------------------------------------------------------

    def forget(self, conversation_id: str) -> bool:
        """Drop a conversation, its files and its state at once; False when it is unknown."""
        with self._lock:
            running = self._running.get(conversation_id)
            if running is not None:
                running.forgotten = True  # its answer is not remembered either
            known = conversation_id in self._table
            self._drop(conversation_id)
            return known or running is not None

    def expire(self) -> int:
        """Drop every conversation past its time to live; returns how many."""
        with self._lock:
            now = self._clock()
            expired = [
                conversation.id
                for conversation in self._table.values()
                if self._expired(conversation, now)
            ]
            for conversation_id in expired:
                log.info("conversation %s expired", conversation_id)
                self._drop(conversation_id)
            return len(expired)

    @property
    def active(self) -> int:
        return len(self._table)

    @property
    def state_bytes(self) -> int:
        return self._state_bytes

    def _live(self, conversation_id: str) -> _Conversation | None:
        conversation = self._table.get(conversation_id)
        if conversation is not None and self._expired(conversation, self._clock()):
            log.info("conversation %s expired", conversation_id)
            self._drop(conversation_id)
            return None
        return conversation

    def _expired(self, conversation: _Conversation, now_s: float) -> bool:
        # A turn in progress keeps its conversation: it answers within seconds.
        return (
            conversation.last_used_s + self._ttl_s <= now_s and conversation.id not in self._running
        )

    def _drop(self, conversation_id: str) -> None:
        conversation = self._table.pop(conversation_id, None)
        if conversation is not None:
            self._set_state(conversation, None)
        if self._files is not None:
            self._files.remove(conversation_id)

    def _set_state(self, conversation: _Conversation, state: SavedState | None) -> None:
        old = conversation.state
        self._state_bytes += (0 if state is None else state.nbytes) - (
            0 if old is None else old.nbytes
        )
        conversation.state = state

    def _fit_states(self, keep: _Conversation | None) -> None:
        """Drop saved states, least recently used first, until they fit max_state_mb; their
        conversations go on from their text."""
        if self._state_bytes <= self._max_state_bytes:
            return
        order = [c for c in self._table.values() if c is not keep]
        if keep is not None:
            order.append(keep)  # the newest goes last, and only if it alone is too big
        for conversation in order:
            if self._state_bytes <= self._max_state_bytes:
                return
            if conversation.state is None:
                continue
            self._set_state(conversation, None)
            conversation.version += 1
            if self._files is not None and conversation.state_on_disk is not None:
                # The disk keeps to the same budget as the memory.
                self._files.remove_state(conversation.id)
                conversation.state_on_disk = None

    # --- the disk ------------------------------------------------------------------------

    def load(self, files: StateFiles) -> int:
        """Save to `files` from now on, and take in what it holds (at start); returns how many."""
        self._files = files
        try:
            records = files.load(now_s=self._clock(), ttl_s=self._ttl_s)
        except OSError as exc:
            log.error("cannot read the saved conversations in %s: %s", files.directory, exc)
            return 0
        with self._lock:
            # Newest first: beyond max_active, the oldest ones are the ones left out.
            for index, record in enumerate(records):
                if index >= self._max_active:
                    log.info("conversation %s dropped: beyond max_active", record.id)
                    files.remove(record.id)
                    continue
                conversation = _Conversation(
                    record.id,
                    record.exchanges,
                    record.turns,
                    record.dropped_turns,
                    record.last_used_s,
                )
                conversation.state_on_disk = record.state
                conversation.saved_version = conversation.version
                self._set_state(conversation, record.state)
                self._table[record.id] = conversation
                self._table.move_to_end(record.id, last=False)
            self._fit_states(keep=None)
        return len(self._table)

    def save(self) -> int:
        """Write every conversation changed since its last save; returns how many."""
        files = self._files
        if files is None:
            return 0
        with self._lock:
            changed = [
                (conversation, conversation.version, conversation.record())
                for conversation in self._table.values()
                if conversation.version != conversation.saved_version
            ]
        for conversation, version, record in changed:
            with self._lock:
                if self._table.get(record.id) is not conversation:
                    continue
                if conversation.state_on_disk is not record.state:
                    # The old state goes before the new one is written, so that the disk
                    # never holds both and keeps to max_state_mb (a crash in between leaves
                    # the text, which is read again).
                    if conversation.state_on_disk is not None:
                        files.remove_state(record.id)
                    conversation.state_on_disk = None
            try:
                prepared = files.prepare(record, state_on_disk=conversation.state_on_disk)
            except OSError as exc:
                log.error("cannot save conversation %s: %s", record.id, exc)
                continue
            with self._lock:
                if self._table.get(record.id) is not conversation:
                    prepared.discard()  # forgotten or dropped meanwhile
                    continue
                try:
                    prepared.commit()
                except OSError as exc:
                    log.error("cannot save conversation %s: %s", record.id, exc)
                    prepared.discard()
                    continue
                conversation.saved_version = version
                conversation.state_on_disk = record.state
                if record.state is not None and conversation.state is not record.state:
                    # The budget dropped the state while it was written: so does the disk.
                    files.remove_state(record.id)
                    conversation.state_on_disk = None
        return len(changed)


class Saver:
    """A thread that saves conversations when kioskd goes idle, and drops expired ones on time
    (their files too), so that a restart and the disk see what the protocol promises."""

    def __init__(self, store: ConversationStore, *, ttl_s: float) -> None:
        self._store = store
        self._sweep_s = min(30.0, max(0.5, ttl_s / 4))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kioskd-saver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def idle(self) -> None:
        """kioskd has nothing to answer: a good time to write to disk."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, then save what changed since (at shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._run_once()

    def _loop(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self._sweep_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._store.expire()
            if woken:
                self._run_once()

    def _run_once(self) -> None:
        try:
            self._store.expire()
            saved = self._store.save()
            if saved:
                log.debug("saved %d conversations", saved)
        except Exception:
            log.exception("saving conversations failed; trying again when idle")
