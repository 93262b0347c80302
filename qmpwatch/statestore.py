"""The last known run status of every VM, in SQLite under `state_dir`, across restarts.

A VM found paused when the daemon (re)starts is only "unexplained" if its status differs from
what qmpwatch last saw; this file is that memory. Writes happen only when a status changes.
If the state directory is unusable the store keeps working in memory and says why, once: a
watcher that cannot persist is still far better than one that stops. A write that fails later
(a full disk) is logged once as `state_store_unavailable`; the statuses not written are
written with the next write that works, which logs `state_store_recovered`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import structlog

FILE_NAME = "state.sqlite3"


class StateStore:
    """VM name -> last known status."""

    def __init__(self, state_dir: Path | None) -> None:
        """Open (or create) the store under `state_dir`; None keeps it in memory only."""
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self.problem: str | None = None
        self._memory: dict[str, str | None] = {}
        self._unsaved: set[str] = set()  # VMs whose last write failed
        self._db: sqlite3.Connection | None = None
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
            for vm, status in db.execute("SELECT vm, status FROM vm_status"):
                self._memory[vm] = status
            self._db = db
        except (OSError, sqlite3.Error) as err:
            self.problem = f"{self.path}: {err}"

    def last_status(self, vm: str) -> str | None:
        return self._memory.get(vm)

    def set_status(self, vm: str, status: str | None) -> None:
        if vm in self._memory and self._memory[vm] == status and vm not in self._unsaved:
            return
        self._memory[vm] = status
        if self._db is None:
            return
        self._unsaved.add(vm)
        try:
            for name in sorted(self._unsaved):
                self._db.execute(
                    "INSERT INTO vm_status (vm, status, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(vm) DO UPDATE SET status = excluded.status, "
                    "updated_at = excluded.updated_at",
                    (name, self._memory[name], time.time()),
                )
        except sqlite3.Error as err:
            if self.problem is None:
                structlog.get_logger().error(
                    "state_store_unavailable",
                    error=f"{self.path}: {err}",
                    effect="run statuses are kept in memory until a write works again",
                )
            self.problem = f"{self.path}: {err}"
            return
        self._unsaved.clear()
        if self.problem is not None:
            self.problem = None
            structlog.get_logger().info("state_store_recovered", path=str(self.path))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
