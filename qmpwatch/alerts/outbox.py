"""The alert outbox: a bounded, durable queue of alert notifications owed to each sink.

SQLite in WAL mode under `state_dir` (memory only without one), so a restart, even after
SIGKILL, resumes where delivery stopped; memory is authoritative while the daemon runs. Writes
are committed once per event-loop turn (`EndOfTurn`) and before any read that hands entries to
a sink. A full outbox drops by class (resolved and `info` first, never a firing `critical`).
docs/architecture.md ("The outbox", "One turn, three journals") has the rules and what a crash
loses.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from qmpwatch.aio.commits import Committer
from qmpwatch.aio.turns import EndOfTurn
from qmpwatch.core.alert import Alert
from qmpwatch.core.errors import QmpwatchError

Status = Literal["firing", "resolved"]
SCHEMA_VERSION = 1
DB_NAME = "outbox.sqlite3"
LOCK_NAME = "outbox.lock"

_log = structlog.get_logger()

_Write = Callable[[sqlite3.Connection], object]  # one queued write: SQL statements on `db`
_with_queued: set[Outbox] = set()  # the outboxes with writes queued, for `flush_all`

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    alert TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER NOT NULL REFERENCES entry(seq) ON DELETE CASCADE,
    sink TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (seq, sink)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active (
    fingerprint TEXT PRIMARY KEY,
    alert TEXT NOT NULL
);
"""


class OutboxError(QmpwatchError):
    """The outbox cannot be opened: state_dir unusable, database corrupt, or already in use."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One notification owed to the sinks: `alert` is `status` since `at` (epoch seconds)."""

    seq: int
    key: str  # idempotency key, the same on every attempt and after restarts
    status: Status
    at: float  # firing: when it was raised; resolved: when it was resolved
    alert: Alert

    @property
    def drop_class(self) -> int:
        """0: dropped first (resolved or info), 1: warning, 2: critical (never dropped)."""
        if self.status == "resolved" or self.alert.severity == "info":
            return 0
        return 1 if self.alert.severity == "warning" else 2


@dataclass(slots=True)
class _Owed:
    attempts: int = 0
    next_at: float = 0.0  # epoch seconds; 0: due now


@dataclass(slots=True)
class _State:
    entries: dict[int, Entry] = field(default_factory=dict)  # by seq, in seq order
    keys: dict[str, int] = field(default_factory=dict)  # idempotency key -> seq
    owed: dict[str, dict[int, _Owed]] = field(default_factory=dict)  # sink -> seq -> state
    active: dict[str, Alert] = field(default_factory=dict)  # fingerprint -> alert
    # fingerprint -> the sinks its firing went to: its resolution goes to each of them, even
    # after a reload removed or changed one (in memory: after a restart, the sinks then).
    fired_to: dict[str, set[str]] = field(default_factory=dict)


def alert_to_json(alert: Alert) -> bytes:
    return orjson.dumps(
        {
            "kind": alert.kind,
            "severity": alert.severity,
            "vm": alert.vm,
            "summary": alert.summary,
            "cause": alert.cause,
            "raised_at": alert.raised_at,
            "details": dict(alert.details),
        },
        default=str,
    )


def alert_from_json(raw: str | bytes) -> Alert:
    d: dict[str, Any] = orjson.loads(raw)
    return Alert(
        kind=d["kind"],
        severity=d["severity"],
        vm=d["vm"],
        summary=d["summary"],
        cause=d["cause"],
        raised_at=float(d["raised_at"]),
        details=d.get("details") or {},
    )


class Outbox:
    """The durable, bounded outbox of one daemon; docs/architecture.md has the rules."""

    def __init__(self, state_dir: Path | None, *, sinks: Iterable[str], max_entries: int) -> None:
        """Open (or create) the outbox under `state_dir`; None: in memory only, not durable.

        Raises OutboxError when `state_dir` cannot hold it, is in use, or is corrupt.
        """
        self.path = state_dir / DB_NAME if state_dir is not None else None
        self.max_entries = max_entries
        self.sinks = tuple(dict.fromkeys(sinks))
        # Sinks a reload removed (or whose receiver changed) that are still owed resolutions
        # of alerts they received: served until delivered (not across a restart).
        self.retained: set[str] = set()
        self._over_capacity = False
        self._closed = False
        self.problem: str | None = None  # why the last commit failed, until one works again
        self._db: sqlite3.Connection | None = None
        self._queued: list[tuple[str, _Write]] = []  # (op, write) not committed yet, in order
        self._end_of_turn = EndOfTurn(self.flush)
        self._committer = Committer()
        self._lock_fd = -1
        if state_dir is None:
            self._state = _State(owed={sink: {} for sink in self.sinks})
        else:
            self._lock_fd = _lock(state_dir)
            try:
                self._db = self._open(state_dir / DB_NAME)
                self._state = self._load(self._db)
            except sqlite3.Error as err:
                self.close()
                raise OutboxError(f"{self.path}: cannot use the alert outbox: {err}") from err
            except BaseException:
                self.close()
                raise
        self._next_seq = max(self._state.entries, default=0) + 1
        self._enforce_bound(None)
        if self._state.entries:
            _log.info("alert_outbox_resumed", undelivered=len(self._state.entries))

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        # Commits run in a lane of their own (`qmpwatch.aio.commits`), one at a time.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this qmpwatch ({SCHEMA_VERSION})"
                )
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _load(self, db: sqlite3.Connection) -> _State:
        state = _State(owed={sink: {} for sink in self.sinks})
        gone = [
            (sink, count)
            for sink, count in db.execute("SELECT sink, COUNT(*) FROM pending GROUP BY sink")
            if sink not in state.owed
        ]
        with _transaction(db):
            for sink, count in gone:
                db.execute("DELETE FROM pending WHERE sink = ?", (sink,))
                _log.info("alert_outbox_pruned", sink_id=sink, entries=count)
            db.execute("DELETE FROM entry WHERE seq NOT IN (SELECT seq FROM pending)")
            # A restart retries at once whatever was waiting for its backoff.
            db.execute("UPDATE pending SET next_at = 0")
        for seq, key, status, at, alert in db.execute(
            "SELECT seq, key, status, at, alert FROM entry ORDER BY seq"
        ):
            state.entries[seq] = Entry(seq, key, status, at, alert_from_json(alert))
            state.keys[key] = seq
        for seq, sink, attempts in db.execute(
            "SELECT seq, sink, attempts FROM pending ORDER BY seq"
        ):
            state.owed[sink][seq] = _Owed(attempts, 0.0)
        for fingerprint, alert in db.execute("SELECT fingerprint, alert FROM active"):
            state.active[fingerprint] = alert_from_json(alert)
            state.fired_to[fingerprint] = set(self.sinks)
        return state

    def close(self) -> None:
        """Commit the queued writes, close the database and release the lock (idempotent)."""
        self._closed = True
        try:
            self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        try:
            if self._db is not None and self._committer.drain():
                self._db.close()
                self._db = None
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def durable(self) -> bool:
        """False for an in-memory outbox."""
        return self.path is not None

    # -- adding ----------------------------------------------------------------------------

    def set_sinks(self, sinks: Iterable[str]) -> None:
        """The configured sinks changed (a reload): a new sink is owed the notifications from
        now on; a sink that is gone is owed no firing any more, but keeps (is `retained` for)
        the resolutions of the alerts it received, until they are delivered."""
        new = tuple(dict.fromkeys(sinks))
        state = self._state
        entries = state.entries
        gone = [sink for sink in (*self.sinks, *self.retained) if sink not in new]
        unowed: list[tuple[int, str]] = []  # (seq, sink) no longer owed
        for sink in gone:
            owed = state.owed.get(sink, {})
            firing = [seq for seq in owed if entries[seq].status == "firing"]
            for seq in firing:
                del owed[seq]  # never delivered: it never saw the alert fire
                state.fired_to.get(entries[seq].alert.fingerprint, set()).discard(sink)
            unowed += [(seq, sink) for seq in firing]
            self.retained.add(sink)
        for sink in new:
            state.owed.setdefault(sink, {})
            self.retained.discard(sink)
        self.sinks = new
        self._release_retained()
        done = [seq for seq in entries if not any(seq in o for o in state.owed.values())]
        for seq in done:
            self._forget(seq)
        if self._db is None or not (unowed or done):
            return

        def write(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM pending WHERE seq = ? AND sink = ?", unowed)
            db.executemany("DELETE FROM entry WHERE seq = ?", [(seq,) for seq in done])

        self._write("set_sinks", write)

    def retains(self, sink: str) -> bool:
        """Whether `sink`, gone from the configuration, is still owed or due resolutions."""
        return sink in self.retained

    def _release_retained(self) -> None:
        """Forget the retained sinks that are owed nothing and received no firing alert."""
        state = self._state
        for sink in list(self.retained):
            owed = state.owed.get(sink, {})
            if owed or any(sink in sinks for sinks in state.fired_to.values()):
                continue
            self.retained.discard(sink)
            state.owed.pop(sink, None)
            _log.info("alert_outbox_pruned", sink_id=sink, entries=0)

    def add(
        self, alert: Alert, status: Status, at: float, key: str, *, active: bool | None = None
    ) -> Entry | None:
        """Queue a notification for every sink; None if it is a duplicate, dropped or unowed.

        `active=True` remembers the alert as active (until a resolution with `active=False`
        forgets it); None leaves the active set alone.
        """
        state = self._state
        fingerprint = alert.fingerprint
        targets = self.sinks
        if status == "firing" and active is True and key not in state.keys:
            state.fired_to[fingerprint] = set(self.sinks)
        elif status == "resolved":
            fired = state.fired_to.pop(fingerprint, set())
            targets = (*self.sinks, *sorted(s for s in fired if s in self.retained))
        if active is True:
            state.active[fingerprint] = alert
        elif active is False:
            state.active.pop(fingerprint, None)
        if key in state.keys or not targets:
            if active is not None and self._db is not None:
                active_json = alert_to_json(alert) if active else b""
                self._write(
                    "active", lambda db: _write_active(db, fingerprint, active_json, active)
                )
            return None
        entry = Entry(self._next_seq, key, status, at, alert)
        self._next_seq += 1
        state.entries[entry.seq] = entry
        state.keys[key] = entry.seq
        for sink in targets:
            state.owed[sink][entry.seq] = _Owed()
        dropped = self._enforce_bound(entry)
        kept = entry.seq in state.entries
        if self._db is None:
            return entry if kept else None
        # Serialized now, so that the queued write holds plain values only.
        alert_json = alert_to_json(alert) if kept or active else b""
        pending = [(entry.seq, sink) for sink in targets] if kept else []
        gone = [(e.seq,) for e in dropped if e is not entry]
        if not kept and not gone and active is None:
            return None

        def write(db: sqlite3.Connection) -> None:
            if kept:
                db.execute(
                    "INSERT INTO entry (seq, key, status, at, alert) VALUES (?, ?, ?, ?, ?)",
                    (entry.seq, key, status, at, alert_json),
                )
                db.executemany("INSERT INTO pending (seq, sink) VALUES (?, ?)", pending)
            if gone:
                db.executemany("DELETE FROM entry WHERE seq = ?", gone)
            _write_active(db, fingerprint, alert_json, active)

        self._write("add", write)
        return entry if kept else None

    def _enforce_bound(self, new: Entry | None) -> list[Entry]:
        """Drop entries while the outbox is over its bound (memory only); returns them."""
        entries = self._state.entries
        dropped: list[Entry] = []
        while len(entries) > self.max_entries:
            victim = next(
                (e for cls in (0, 1) for e in entries.values() if e.drop_class == cls), None
            )
            if victim is None:
                if not self._over_capacity:
                    _log.error(
                        "alert_outbox_over_capacity",
                        undelivered=len(entries),
                        outbox_max_entries=self.max_entries,
                    )
                    self._over_capacity = True
                break
            self._forget(victim.seq)
            dropped.append(victim)
            _log.warning(
                "alert_dropped",
                vm=victim.alert.vm,
                alert=victim.alert.kind,
                severity=victim.alert.severity,
                status=victim.status,
                fingerprint=victim.alert.fingerprint,
                key=victim.key,
                reason="outbox_full",
                outbox_max_entries=self.max_entries,
            )
        if len(entries) <= self.max_entries:
            self._over_capacity = False
        if new is None and dropped:  # bound lowered since the last run
            gone = [(e.seq,) for e in dropped]
            self._write("drop", lambda db: db.executemany("DELETE FROM entry WHERE seq = ?", gone))
        return dropped

    def _forget(self, seq: int) -> None:
        entry = self._state.entries.pop(seq, None)
        if entry is not None:
            del self._state.keys[entry.key]
        for owed in self._state.owed.values():
            owed.pop(seq, None)

    # -- delivering ------------------------------------------------------------------------

    def next_for(self, sink: str, now: float) -> tuple[Entry | None, float | None]:
        """The entry `sink` should get now, else None and when the next one is due (or None).

        Only the oldest owed entry of each fingerprint is a candidate; the oldest due
        candidate wins. Commits the queued writes first (`flush`), so the entry returned is
        in the database before any attempt to deliver it.
        """
        if self._queued:
            self.flush()
        owed = self._state.owed.get(sink, {})
        entries = self._state.entries
        seen: set[str] = set()
        soonest: float | None = None
        for seq, state in owed.items():
            entry = entries[seq]
            fingerprint = entry.alert.fingerprint
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            if state.next_at <= now:
                return entry, None
            if soonest is None or state.next_at < soonest:
                soonest = state.next_at
        return None, soonest

    def is_owed(self, sink: str, seq: int) -> bool:
        return seq in self._state.owed.get(sink, {})

    def attempts(self, sink: str, seq: int) -> int:
        owed = self._state.owed.get(sink, {}).get(seq)
        return 0 if owed is None else owed.attempts

    def delivered(self, sink: str, seq: int) -> None:
        """`sink` has the entry; the entry leaves the outbox when every sink has it."""
        owed = self._state.owed.get(sink)  # None: the sink was removed by a reload meanwhile
        if owed is None or owed.pop(seq, None) is None:
            return  # dropped meanwhile
        done = not any(seq in owed for owed in self._state.owed.values())
        if done:
            self._forget(seq)
        if sink in self.retained:
            self._release_retained()

        def write(db: sqlite3.Connection) -> None:
            if done:
                db.execute("DELETE FROM entry WHERE seq = ?", (seq,))
            else:
                db.execute("DELETE FROM pending WHERE seq = ? AND sink = ?", (seq, sink))

        self._write("delivered", write)

    def failed(self, sink: str, seq: int, next_at: float) -> int:
        """An attempt failed; retry not before `next_at`. Returns the attempts so far."""
        owed = self._state.owed.get(sink, {}).get(seq)
        if owed is None:
            return 0
        owed.attempts += 1
        owed.next_at = next_at
        attempts = owed.attempts
        self._write(
            "failed",
            lambda db: db.execute(
                "UPDATE pending SET attempts = ?, next_at = ? WHERE seq = ? AND sink = ?",
                (attempts, next_at, seq, sink),
            ),
        )
        return attempts

    # -- looking ---------------------------------------------------------------------------

    def depth(self) -> int:
        """Entries not yet delivered to every sink."""
        return len(self._state.entries)

    def owed_to(self, sink: str) -> int:
        return len(self._state.owed.get(sink, ()))

    def owed_fingerprints(self, sink: str) -> set[str]:
        """The fingerprints of the alerts with a notification still owed to `sink`."""
        entries = self._state.entries
        return {entries[seq].alert.fingerprint for seq in self._state.owed.get(sink, {})}

    def entries(self) -> list[Entry]:
        return list(self._state.entries.values())

    def active(self) -> list[Alert]:
        """Alerts fired and not resolved, oldest first (committing the queued writes first)."""
        if self._queued:
            self.flush()
        return sorted(self._state.active.values(), key=lambda a: a.raised_at)

    # -- writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Commit the queued writes now, in order, in one transaction; no-op when none.

        Runs by itself right after the loop turn that queued them; call it before anything
        that relies on the journal holding what memory holds. A failure rolls the whole batch
        back and is logged once (`alert_outbox_write_failed`); memory is not affected.
        """
        self._end_of_turn.cancel()
        _with_queued.discard(self)
        if not self._queued:
            return
        writes, self._queued = self._queued, []
        db = self._db
        if db is None:
            return

        def work() -> None:
            with _transaction(db):
                for _, write in writes:
                    write(db)

        self._committer.commit(work, lambda err: self._committed(writes, err))

    def _committed(self, writes: list[tuple[str, _Write]], err: BaseException | None) -> None:
        """The outcome of one commit (on the loop, once it is known)."""
        if err is not None:
            self.problem = f"{self.path}: the last commit failed: {err}"
            _log.error(
                "alert_outbox_write_failed",
                op=",".join(dict.fromkeys(op for op, _ in writes)),
                writes=len(writes),
                path=str(self.path),
                error=str(err),
            )
            return
        if self.problem is not None:
            self.problem = None
            _log.info("alert_outbox_recovered", path=str(self.path))

    def _write(self, op: str, write: _Write) -> None:
        """Queue `write` for the end of this loop turn; outside a running loop, commit it now."""
        if self._db is None:
            return
        self._queued.append((op, write))
        _with_queued.add(self)
        self._end_of_turn.schedule()


def flush_all() -> None:
    """Commit the queued writes of every outbox of this process now (`Outbox.flush`)."""
    for box in list(_with_queued):
        box.flush()


def _write_active(
    db: sqlite3.Connection, fingerprint: str, alert_json: bytes, active: bool | None
) -> None:
    if active is True:
        db.execute(
            "INSERT OR REPLACE INTO active (fingerprint, alert) VALUES (?, ?)",
            (fingerprint, alert_json),
        )
    elif active is False:
        db.execute("DELETE FROM active WHERE fingerprint = ?", (fingerprint,))


class _transaction:
    """`with _transaction(db):` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error.

    A failed COMMIT is rolled back too (SQLite may leave the transaction open after one), so
    that the next batch starts clean; the error that caused it is the one raised.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")


def _lock(state_dir: Path) -> int:
    """Take `outbox.lock` so that two daemons never deliver from one outbox."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise OutboxError(
            f"{state_dir}: cannot create the alert outbox: {err.strerror or err}"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise OutboxError(
            f"{state_dir / LOCK_NAME}: the alert outbox is in use by another process"
        ) from err
    return fd
