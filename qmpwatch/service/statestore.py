"""The last known run status of every VM, in SQLite under `state_dir`, across restarts.

A VM found paused at start-up is only "unexplained" if its status differs from what qmpwatch
last saw; this is that memory. It also keeps who owns each VM name (`owner`, `pin`: the uid of
the first QEMU that spoke for it, and its socket for a discovered one). Memory is
authoritative; changes are committed once per event-loop turn (`EndOfTurn`), after the alert
outboxes. An unusable directory leaves the store in memory, said once. docs/architecture.md
("The state store", "One turn, three journals").
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import structlog

from qmpwatch.aio.commits import Committer
from qmpwatch.aio.turns import EndOfTurn
from qmpwatch.alerts.outbox import flush_all as flush_outboxes
from qmpwatch.core.pins import Owner

FILE_NAME = "state.sqlite3"

_UPSERT = (
    "INSERT INTO vm_status (vm, status, updated_at, source) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(vm) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, "
    "source = excluded.source"
)

_PIN = (
    "INSERT INTO vm_owner (vm, uid, socket, pinned_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(vm) DO UPDATE SET uid = excluded.uid, socket = excluded.socket, "
    "pinned_at = excluded.pinned_at"
)


def flush_all() -> None:
    """Commit every alert outbox's and then every state store's queued writes, now.

    For whatever must not get ahead of the journals, such as a log writer about to write the
    lines of the turn that made these writes.
    """
    flush_outboxes()
    for store in list(_with_unsaved):
        store.flush()


class StateStore:
    """VM name -> last known status (and the source that found the VM)."""

    def __init__(self, state_dir: Path | None) -> None:
        """Open (or create) the store under `state_dir`; None keeps it in memory only."""
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self.problem: str | None = None
        self._memory: dict[str, str | None] = {}
        self._sources: dict[str, str] = {}
        self._owners: dict[str, Owner] = {}
        self._unsaved_owners: set[str] = set()
        self._unsaved: set[str] = set()  # VMs whose status is not written (queued or failed)
        self._db: sqlite3.Connection | None = None
        self._end_of_turn = EndOfTurn(self.flush)
        self._committer = Committer()
        if state_dir is None or self.path is None:
            return
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS vm_status "
                "(vm TEXT PRIMARY KEY, status TEXT, updated_at REAL NOT NULL)"
            )
            columns = [row[1] for row in db.execute("PRAGMA table_info(vm_status)")]
            if "source" not in columns:  # written by qmpwatch before sources had names
                db.execute("ALTER TABLE vm_status ADD COLUMN source TEXT")
            for vm, status, source in db.execute("SELECT vm, status, source FROM vm_status"):
                self._memory[vm] = status
                if source:
                    self._sources[vm] = source
            db.execute(
                "CREATE TABLE IF NOT EXISTS vm_owner (vm TEXT PRIMARY KEY, uid INTEGER NOT NULL, "
                "socket TEXT NOT NULL, pinned_at REAL NOT NULL)"
            )
            for vm, uid, path in db.execute("SELECT vm, uid, socket FROM vm_owner"):
                self._owners[vm] = Owner(uid, path)
            self._db = db
        except (OSError, sqlite3.Error) as err:
            self.problem = f"{self.path}: {err}"

    def last_status(self, vm: str) -> str | None:
        return self._memory.get(vm)

    def known(self, source: str) -> dict[str, str | None]:
        """The VMs last found by `source`, with their last status."""
        return {vm: self._memory.get(vm) for vm, s in self._sources.items() if s == source}

    def set_source(self, vm: str, source: str) -> None:
        """Remember which source found `vm` (written with its status)."""
        if self._sources.get(vm) == source:
            return
        self._sources[vm] = source
        self._mark(vm)

    def owner(self, vm: str) -> Owner | None:
        """Who `vm`'s name is pinned to, if anyone spoke for it yet."""
        return self._owners.get(vm)

    def pin(self, vm: str, owner: Owner) -> None:
        """Pin `vm`'s name to `owner` (written with the turn's statuses)."""
        if self._owners.get(vm) == owner:
            return
        self._owners[vm] = owner
        if self._db is not None:
            self._unsaved_owners.add(vm)
            self._mark(vm)

    def set_status(self, vm: str, status: str | None) -> None:
        """Remember `status` for `vm`; written at the end of this loop turn (or now, outside
        a running loop)."""
        if vm in self._memory and self._memory[vm] == status and vm not in self._unsaved:
            return
        self._memory[vm] = status
        self._mark(vm)

    def _mark(self, vm: str) -> None:
        if self._db is None:
            return
        self._unsaved.add(vm)
        _with_unsaved.add(self)
        self._end_of_turn.schedule()

    def flush(self) -> None:
        """Write the latest status of every unsaved VM now, in one transaction.

        Runs by itself right after the loop turn that changed them. On failure memory keeps
        the statuses and they stay unsaved, to be written with the next write that works.
        """
        self._end_of_turn.cancel()
        _with_unsaved.discard(self)
        db = self._db
        if db is None or not self._unsaved:
            return
        flush_outboxes()  # the alerts raised before these statuses go first
        now = time.time()
        rows = [
            (vm, self._memory.get(vm), now, self._sources.get(vm)) for vm in sorted(self._unsaved)
        ]
        owners = [
            (vm, self._owners[vm].uid, self._owners[vm].socket, now)
            for vm in sorted(self._unsaved_owners)
        ]
        self._unsaved.clear()  # until the commit says otherwise
        self._unsaved_owners.clear()

        def work() -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_UPSERT, rows)
                db.executemany(_PIN, owners)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

        self._committer.commit(
            work, lambda err: self._committed([r[0] for r in rows], [o[0] for o in owners], err)
        )

    def _committed(self, vms: list[str], pinned: list[str], err: BaseException | None) -> None:
        """The outcome of one commit (on the loop, once it is known)."""
        if err is not None:
            self._unsaved.update(vms)  # written with the next write that works
            self._unsaved_owners.update(pinned)
            if self.problem is None:
                structlog.get_logger().error(
                    "state_store_unavailable",
                    error=f"{self.path}: {err}",
                    effect="run statuses are kept in memory until a write works again",
                )
            self.problem = f"{self.path}: {err}"
            return
        if self.problem is not None:
            self.problem = None
            structlog.get_logger().info("state_store_recovered", path=str(self.path))

    def close(self) -> None:
        """Write what is unsaved (`flush`), then close the database (idempotent)."""
        try:
            self.flush()
        finally:
            if self._db is not None and self._committer.drain():
                self._db.close()
                self._db = None


_with_unsaved: set[StateStore] = set()  # the stores with a flush due, for `flush_all`
