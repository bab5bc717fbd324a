"""Conversations on disk: one JSON file of text per conversation, and its model state beside it.

`<id>.json` holds the turns as text and, when a state was saved, the state's identity (which
model file, context size, chat template and system prompt it belongs to), its tokens, size and
checksum. `<id>.state` holds the bytes llama.cpp wrote. Both are written to a temporary file
and renamed, so a crash leaves the old file or the new one, never half of one. A state whose
identity does not match the running model, or whose bytes do not match its checksum, is
deleted and the conversation's text is read again instead; a JSON file that cannot be read is
deleted. Neither stops kioskd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import data_dir
from daemon.messages import ID_PATTERN
from daemon.seqstate import SavedState, blank

log = logging.getLogger(__name__)

FORMAT = 1
_HEAD_BYTES = 1 << 20  # the GGUF header and metadata, hashed as the model file's fingerprint


def default_dir(configured: str | None = None) -> Path:
    """Where conversations are saved (systemd's StateDirectory when set)."""
    return data_dir("conversations", configured)


@dataclass(frozen=True)
class Identity:
    """What a saved model state belongs to; any difference makes it useless."""

    model: str  # size, modification time and a hash of the first MiB of the GGUF file
    ctx: int
    template_sha256: str
    system_prompt_sha256: str
    llama: str  # the llama.cpp build, whose state format may change between versions

    @classmethod
    def of(
        cls, *, model_path: Path, ctx: int, template: str, system_prompt: str, llama: str
    ) -> Identity:
        stat = model_path.stat()
        with model_path.open("rb") as file:
            head = hashlib.sha256(file.read(_HEAD_BYTES)).hexdigest()
        return cls(
            model=f"{stat.st_size}:{stat.st_mtime_ns}:{head}",
            ctx=ctx,
            template_sha256=_sha256(template),
            system_prompt_sha256=_sha256(system_prompt),
            llama=llama,
        )

    def differences(self, saved: Any) -> list[str]:
        """What differs between a saved identity and this one, for a person (all of it, if
        the saved one cannot be read)."""
        mine = dataclasses.asdict(self)
        if not isinstance(saved, dict):
            saved = {}
        return [_NAMES[name] for name, value in mine.items() if saved.get(name) != value]


_NAMES = {
    "model": "model file",
    "ctx": "model.ctx",
    "template_sha256": "chat template",
    "system_prompt_sha256": "model.system_prompt",
    "llama": "llama.cpp version",
}


@dataclass(frozen=True)
class Record:
    """A conversation as saved: its text, and its model state if it has one."""

    id: str
    exchanges: tuple[tuple[str, str], ...]
    turns: int
    dropped_turns: int
    last_used_s: float
    state: SavedState | None = None


class Prepared:
    """A record written to temporary files, waiting to replace the saved one."""

    def __init__(self, files: StateFiles, record: Record, json_tmp: Path, state_tmp: Path | None):
        self._files = files
        self._record = record
        self._json_tmp = json_tmp
        self._state_tmp = state_tmp

    def commit(self) -> None:
        """Make the new files the saved ones (fast: renames only)."""
        json_path, state_path = self._files.paths(self._record.id)
        if self._state_tmp is not None:
            self._state_tmp.replace(state_path)
        elif self._record.state is None:
            state_path.unlink(missing_ok=True)
        self._json_tmp.replace(json_path)

    def discard(self) -> None:
        self._json_tmp.unlink(missing_ok=True)
        if self._state_tmp is not None:
            self._state_tmp.unlink(missing_ok=True)


class StateFiles:
    """The directory of saved conversations."""

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.directory = directory
        self.identity = identity

    def paths(self, conversation_id: str) -> tuple[Path, Path]:
        # Ids are [A-Za-z0-9._-]{1,64}: a plain file name, never a path ("..json" is a name).
        return (
            self.directory / f"{conversation_id}.json",
            self.directory / f"{conversation_id}.state",
        )

    def prepare(self, record: Record, *, state_on_disk: SavedState | None) -> Prepared:
        """Write `record` to temporary files; its state only if it is not on disk already."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        suffix = f".tmp-{secrets.token_hex(4)}"
        json_path, state_path = self.paths(record.id)
        state_tmp = None
        state = record.state
        if state is not None and state is not state_on_disk:
            state_tmp = state_path.with_name(state_path.name + suffix)
            _write(state_tmp, state.data, sync=False)
        body = {
            "format": FORMAT,
            "id": record.id,
            "turns": record.turns,
            "dropped_turns": record.dropped_turns,
            "last_used_s": record.last_used_s,
            "exchanges": [list(exchange) for exchange in record.exchanges],
            "state": None
            if state is None
            else {
                "identity": dataclasses.asdict(self.identity),
                "tokens": list(state.tokens),
                "bytes": state.nbytes,
                "crc32": zlib.crc32(state.data),
            },
        }
        json_tmp = json_path.with_name(json_path.name + suffix)
        # The text is what a restart cannot do without: on disk before the rename.
        _write(json_tmp, json.dumps(body, ensure_ascii=False).encode("utf-8"), sync=True)
        return Prepared(self, record, json_tmp, state_tmp)

    def remove(self, conversation_id: str) -> None:
        for path in self.paths(conversation_id):
            path.unlink(missing_ok=True)

    def remove_state(self, conversation_id: str) -> None:
        self.paths(conversation_id)[1].unlink(missing_ok=True)

    def bytes_on_disk(self) -> int:
        try:
            return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())
        except FileNotFoundError:
            return 0

    def load(self, *, now_s: float, ttl_s: float) -> list[Record]:
        """Every saved conversation that has not expired, newest first; expired, unreadable
        and stray files are deleted on the way, each with a log line."""
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.iterdir()):
            if ".tmp-" in path.name:
                path.unlink(missing_ok=True)  # left by a crash between write and rename
            elif path.suffix == ".state" and not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)
            elif path.suffix == ".json":
                record = self._load_one(path, now_s=now_s, ttl_s=ttl_s)
                if record is not None:
                    records.append(record)
        records.sort(key=lambda record: record.last_used_s, reverse=True)
        return records

    def _load_one(self, path: Path, *, now_s: float, ttl_s: float) -> Record | None:
        conversation_id = path.stem
        try:
            body = json.loads(path.read_bytes())
            record = _record(body, conversation_id)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipped the saved conversation %s: %s; deleted it", path, exc)
            self.remove(conversation_id)
            return None
        if record.last_used_s + ttl_s <= now_s:
            log.info("conversation %s expired while kioskd was away; deleted it", record.id)
            self.remove(record.id)
            return None
        state = self._load_state(record, body.get("state"))
        return dataclasses.replace(record, state=state)

    def _load_state(self, record: Record, meta: Any) -> SavedState | None:
        if meta is None:
            return None
        state_path = self.paths(record.id)[1]
        why = self._state_problem(meta, state_path)
        if why is not None:
            log.warning(
                "conversation %s: its saved model state %s; its %d turns will be read again as "
                "text",
                record.id,
                why,
                len(record.exchanges),
            )
            state_path.unlink(missing_ok=True)
            return None
        size = int(meta["bytes"])
        data = blank(size)
        with state_path.open("rb") as file:
            read = file.readinto(data)
        if read != size or zlib.crc32(data) != meta["crc32"]:
            log.warning(
                "conversation %s: its saved model state is corrupt (%d of %d bytes, checksum "
                "%s); its %d turns will be read again as text",
                record.id,
                read,
                size,
                "matches" if zlib.crc32(data) == meta["crc32"] else "differs",
                len(record.exchanges),
            )
            state_path.unlink(missing_ok=True)
            return None
        return SavedState(tuple(int(token) for token in meta["tokens"]), data)

    def _state_problem(self, meta: Any, state_path: Path) -> str | None:
        if not isinstance(meta, dict) or not all(
            isinstance(meta.get(key), int) for key in ("bytes", "crc32")
        ):
            return "is described wrongly"
        if not isinstance(meta.get("tokens"), list) or not all(
            isinstance(token, int) for token in meta["tokens"]
        ):
            return "has no valid token list"
        differs = self.identity.differences(meta.get("identity"))
        if differs:
            return f"belongs to another setup ({', '.join(differs)} changed)"
        try:
            size = state_path.stat().st_size
        except FileNotFoundError:
            return "is missing"
        if size != meta["bytes"]:
            return f"is truncated ({size} of {meta['bytes']} bytes)"
        return None


def _record(body: Any, conversation_id: str) -> Record:
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError("not a kioskd conversation file of this version")
    if body.get("id") != conversation_id or not ID_PATTERN.fullmatch(conversation_id):
        raise ValueError("its id does not match its file name")
    exchanges = body["exchanges"]
    if not isinstance(exchanges, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        for pair in exchanges
    ):
        raise ValueError("its turns are not (question, answer) pairs of text")
    turns, dropped, last_used = body["turns"], body["dropped_turns"], body["last_used_s"]
    if not (isinstance(turns, int) and isinstance(dropped, int) and turns >= len(exchanges)):
        raise ValueError("its turn counts are wrong")
    if not isinstance(last_used, int | float):
        raise TypeError("last_used_s is not a number")
    return Record(
        conversation_id,
        tuple((question, answer) for question, answer in exchanges),
        turns,
        dropped,
        float(last_used),
    )


def _write(path: Path, data: Any, *, sync: bool) -> None:
    # Only the kioskd user may read what people asked.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        if sync:
            file.flush()
            os.fsync(file.fileno())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
