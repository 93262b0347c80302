"""The state store: last run status per VM, batched into one transaction per loop turn,
durable across restarts, and never ahead of the alerts raised before it."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from structlog.testing import capture_logs

from qmpwatch.alerts.outbox import DB_NAME, Outbox
from qmpwatch.service.statestore import FILE_NAME, StateStore, flush_all
from tests.support.alert_fixtures import make_alert, run_until_sigkill, sql_statements, wait_until


def statements(store: StateStore) -> list[str]:
    """From now on, every SQL statement `store` runs is appended to the returned list."""
    return sql_statements(store._db)


def on_disk(state_dir: Path) -> dict[str, str | None]:
    """The statuses committed to the store's database, read through a connection of our own."""
    with contextlib.closing(sqlite3.connect(state_dir / FILE_NAME)) as db:
        return dict(db.execute("SELECT vm, status FROM vm_status"))


def test_outside_a_loop_a_status_is_written_at_once(tmp_path: Path) -> None:
    """Without an event loop each change is on disk when `set_status` returns, and the next
    run starts from it."""
    store = StateStore(tmp_path)
    store.set_status("web01", "paused")
    assert on_disk(tmp_path) == {"web01": "paused"}
    store.set_status("web01", "running")
    assert on_disk(tmp_path) == {"web01": "running"}
    store.close()
    again = StateStore(tmp_path)
    assert again.last_status("web01") == "running"
    assert again.last_status("never-seen") is None
    again.close()


async def test_changes_of_one_turn_are_one_transaction_latest_per_vm(tmp_path: Path) -> None:
    """A burst of pauses and resumes costs one transaction per loop turn, writing one row per
    VM with its latest status; nothing is on disk before the turn ends."""
    store = StateStore(tmp_path)
    run = statements(store)
    for i in range(50):
        store.set_status("web01", "paused" if i % 2 == 0 else "running")
        store.set_status(f"vm{i}", "paused")
    store.set_status("web02", "io-error")
    assert store.last_status("web01") == "running"  # memory has it at once
    assert on_disk(tmp_path) == {}

    await wait_until(lambda: len(on_disk(tmp_path)) == 52, what="the turn's commit")
    assert on_disk(tmp_path) == {
        "web01": "running",
        "web02": "io-error",
        **{f"vm{i}": "paused" for i in range(50)},
    }
    assert [s for s in run if s in ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    assert sum(s.startswith("INSERT INTO vm_status") for s in run) == 52
    store.close()


async def test_close_writes_what_the_turn_changed(tmp_path: Path) -> None:
    """Closing in the same turn as a change (the shutdown path) writes it."""
    store = StateStore(tmp_path)
    store.set_status("web01", "paused")
    store.close()
    assert on_disk(tmp_path) == {"web01": "paused"}


KILLED_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from qmpwatch.service.statestore import StateStore

async def main() -> None:
    store = StateStore(Path(sys.argv[1]))
    store.set_status("web01", "paused")
    store.set_status("web02", "running")
    await asyncio.sleep(0)  # the turn ends; its commit callback runs before this task resumes
    store.set_status("web01", "running")
    store.set_status("web03", "paused")
    os.kill(os.getpid(), signal.SIGKILL)  # in the same turn as these two changes

asyncio.run(main())
"""


def test_sigkill_loses_at_most_the_changes_of_the_turn_in_progress(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL and restarted finds every status of the turns before the
    kill; only the changes of the turn the kill cut short are missing."""
    state = tmp_path / "state"
    run_until_sigkill(KILLED_CHILD, str(state))
    again = StateStore(state)
    assert [again.last_status(vm) for vm in ("web01", "web02", "web03")] == [
        "paused",
        "running",
        None,
    ]
    again.close()


async def test_failing_writes_are_reported_once_and_written_when_they_work(
    tmp_path: Path,
) -> None:
    """Commits that fail (the database is full) log one `state_store_unavailable`, however
    many turns fail; memory keeps every status; the next commit that works writes them all
    and logs `state_store_recovered`."""
    store = StateStore(tmp_path)
    db = store._db
    assert db is not None
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # not one page more: a full disk
    names = [f"a-vm-with-a-rather-long-name-{i:04d}" for i in range(300)]
    run = statements(store)
    with capture_logs() as logs:
        for name in names:
            store.set_status(name, "paused")
        await wait_until(lambda: store.problem is not None, what="a failed commit")
        store.set_status(names[0], "running")  # another turn, another failed commit
        await wait_until(lambda: run.count("BEGIN IMMEDIATE") == 2, what="a second commit")
        assert store.problem is not None
        assert store.last_status(names[0]) == "running"
        assert on_disk(tmp_path) == {}
        db.execute("PRAGMA max_page_count = 1073741823")  # space again
        store.set_status(names[1], "running")
        await wait_until(lambda: store.problem is None, what="the commit that works")
    unavailable = [r for r in logs if r["event"] == "state_store_unavailable"]
    assert len(unavailable) == 1
    assert str(tmp_path / FILE_NAME) in unavailable[0]["error"]
    assert "full" in unavailable[0]["error"]
    assert [r["event"] for r in logs if r["event"] == "state_store_recovered"] == [
        "state_store_recovered"
    ]
    assert on_disk(tmp_path) == {
        **dict.fromkeys(names, "paused"),
        names[0]: "running",
        names[1]: "running",
    }
    store.close()


async def test_a_status_is_never_on_disk_before_the_alert_raised_before_it(
    tmp_path: Path,
) -> None:
    """A stop's alert is committed no later than the status it left behind: otherwise a kill
    between the two commits would make the restart take the stop as already alerted."""
    store = StateStore(tmp_path)
    box = Outbox(tmp_path, sinks=("webhook:a",), max_entries=10)
    store.set_status("web02", "running")  # the store's commit is scheduled first this turn
    entry = box.add(make_alert(vm="web01"), "firing", 1.0, "stop-alert", active=True)
    store.set_status("web01", "io-error")
    assert entry is not None
    store.flush()  # the store's end-of-turn commit, which runs before the outbox's
    assert on_disk(tmp_path)["web01"] == "io-error"
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        assert db.execute("SELECT key FROM entry").fetchall() == [("stop-alert",)]
    box.close()
    store.close()


async def test_flush_all_commits_every_journal_now(tmp_path: Path) -> None:
    """`flush_all` (for a log writer that must not get ahead of the journals) commits the
    queued writes of every outbox and store at once, without waiting for the turn to end."""
    store = StateStore(tmp_path)
    box = Outbox(tmp_path, sinks=("webhook:a",), max_entries=10)
    box.add(make_alert(vm="web01"), "firing", 1.0, "stop-alert", active=True)
    store.set_status("web01", "paused")
    assert on_disk(tmp_path) == {}
    flush_all()
    assert on_disk(tmp_path) == {"web01": "paused"}
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        assert db.execute("SELECT key FROM entry").fetchall() == [("stop-alert",)]
    box.close()
    store.close()
