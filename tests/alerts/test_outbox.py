"""The alert outbox: durability, per-alert order, the bound and its drop rule, and the
batching of its writes (one transaction per loop turn, committed before any delivery)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from qmpwatch.alerts.dispatch import AlertDispatcher
from qmpwatch.alerts.outbox import DB_NAME, Entry, Outbox, OutboxError, Status
from qmpwatch.core.alert import Alert, Severity
from qmpwatch.core.config import AlertConfig, WebhookConfig
from tests.support.alert_fixtures import (
    make_alert,
    receiving,
    run_until_sigkill,
    running,
    sql_statements,
    wait_until,
)

SINKS = ("webhook:a", "alertmanager:b")


def add(box: Outbox, alert: Alert, status: Status = "firing", at: float = 1.0) -> Entry | None:
    return box.add(alert, status, at, f"{alert.fingerprint}-{status}-{at}")


def test_wal_mode_and_location(tmp_path: Path) -> None:
    """The outbox is `outbox.sqlite3` under state_dir (created if missing), in WAL mode."""
    box = Outbox(tmp_path / "state", sinks=SINKS, max_entries=10)
    box.close()
    with sqlite3.connect(tmp_path / "state" / DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_entries_survive_reopen(tmp_path: Path) -> None:
    """Undelivered entries, their attempts and the active alerts come back after a restart."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    a, b = make_alert(vm="a"), make_alert(vm="b")
    ea = box.add(a, "firing", 1.0, "key-a", active=True)
    eb = add(box, b)
    assert ea is not None
    assert eb is not None
    box.failed("webhook:a", ea.seq, next_at=1e12)
    box.delivered("webhook:a", eb.seq)
    box.close()

    with capture_logs() as logs:
        again = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    assert [e.key for e in again.entries()] == ["key-a", eb.key]
    assert again.entries()[0].alert == a
    assert again.attempts("webhook:a", ea.seq) == 1
    assert not again.is_owed("webhook:a", eb.seq)
    assert again.is_owed("alertmanager:b", eb.seq)
    # a restart retries at once what was waiting for its backoff
    assert again.next_for("webhook:a", now=2.0) == (again.entries()[0], None)
    assert again.active() == [a]
    assert {"event": "alert_outbox_resumed", "undelivered": 2, "log_level": "info"} in logs
    again.close()


def test_entry_leaves_when_every_sink_has_it(tmp_path: Path) -> None:
    """An entry stays until each sink it is owed to has delivered it."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    entry = add(box, make_alert())
    assert entry is not None
    box.delivered("webhook:a", entry.seq)
    assert box.depth() == 1
    box.delivered("alertmanager:b", entry.seq)
    assert box.depth() == 0
    box.close()
    assert Outbox(tmp_path, sinks=SINKS, max_entries=10).depth() == 0


def test_resolution_never_overtakes_its_firing(tmp_path: Path) -> None:
    """Per sink, one alert's entries go in order; other alerts do not wait behind it."""
    box = Outbox(tmp_path, sinks=("s",), max_entries=10)
    slow, other = make_alert(vm="slow"), make_alert(vm="other")
    firing = add(box, slow, "firing", 1.0)
    resolved = add(box, slow, "resolved", 2.0)
    unrelated = add(box, other, "firing", 3.0)
    assert firing
    assert resolved
    assert unrelated
    assert box.next_for("s", now=10.0) == (firing, None)
    box.failed("s", firing.seq, next_at=20.0)
    assert box.next_for("s", now=10.0) == (unrelated, None)
    box.delivered("s", unrelated.seq)
    assert box.next_for("s", now=10.0) == (None, 20.0)
    assert box.next_for("s", now=20.0) == (firing, None)
    box.delivered("s", firing.seq)
    assert box.next_for("s", now=20.0) == (resolved, None)


def test_duplicate_key_is_queued_once(tmp_path: Path) -> None:
    """Adding a notification with a key already queued is a no-op."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    alert = make_alert()
    assert box.add(alert, "firing", 1.0, "k") is not None
    assert box.add(alert, "firing", 1.0, "k") is None
    assert box.depth() == 1


def test_removed_sink_is_pruned_on_open(tmp_path: Path) -> None:
    """Entries owed to a sink no longer configured are forgotten for it, with a record."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    only_b = add(box, make_alert(vm="x"))
    both = add(box, make_alert(vm="y"))
    assert only_b
    assert both
    box.delivered("webhook:a", only_b.seq)
    box.close()
    with capture_logs() as logs:
        again = Outbox(tmp_path, sinks=("webhook:a",), max_entries=10)
    assert [e.seq for e in again.entries()] == [both.seq]
    assert {
        "event": "alert_outbox_pruned",
        "sink_id": "alertmanager:b",
        "entries": 2,
        "log_level": "info",
    } in logs


def test_second_user_of_state_dir_is_refused(tmp_path: Path) -> None:
    """Two daemons never deliver from one outbox: the second gets an OutboxError."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    with pytest.raises(OutboxError, match="in use by another process"):
        Outbox(tmp_path, sinks=SINKS, max_entries=10)
    box.close()
    Outbox(tmp_path, sinks=SINKS, max_entries=10).close()


def test_unusable_state_dir_is_an_outbox_error(tmp_path: Path) -> None:
    """A state_dir that cannot be created is reported with its path."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match="cannot create the alert outbox"):
        Outbox(blocker / "state", sinks=SINKS, max_entries=10)


def test_corrupt_database_is_an_outbox_error(tmp_path: Path) -> None:
    """A database file that is not SQLite is reported, not silently replaced."""
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="cannot use the alert outbox"):
        Outbox(tmp_path, sinks=SINKS, max_entries=10)
    Outbox(tmp_path / "other", sinks=SINKS, max_entries=10).close()  # the lock was released


def test_full_outbox_drops_resolved_and_info_first(tmp_path: Path) -> None:
    """When full, the oldest resolved/info entry goes, logged as `alert_dropped`."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=3)
    crit, warn, info = (
        make_alert(vm="c"),
        make_alert(vm="w", severity="warning"),
        make_alert(vm="i", severity="info"),
    )
    add(box, crit, "firing", 1.0)
    old_resolved = add(box, crit, "resolved", 2.0)
    add(box, warn, "firing", 3.0)
    with capture_logs() as logs:
        add(box, info, "firing", 4.0)
    assert old_resolved not in box.entries()
    assert [(e.alert.vm, e.status) for e in box.entries()] == [
        ("c", "firing"),
        ("w", "firing"),
        ("i", "firing"),
    ]
    assert logs == [
        {
            "event": "alert_dropped",
            "log_level": "warning",
            "vm": "c",
            "alert": "vm_stopped_io_error",
            "severity": "critical",
            "status": "resolved",
            "fingerprint": crit.fingerprint,
            "key": old_resolved.key if old_resolved else "",
            "reason": "outbox_full",
            "outbox_max_entries": 3,
        }
    ]
    # next: the info alert (class 0) goes before the warning
    add(box, make_alert(vm="c2"), "firing", 5.0)
    assert [e.alert.vm for e in box.entries()] == ["c", "w", "c2"]
    # then the warning
    add(box, make_alert(vm="c3"), "firing", 6.0)
    assert [e.alert.vm for e in box.entries()] == ["c", "c2", "c3"]
    box.close()
    # and the drops were durable
    assert [e.alert.vm for e in Outbox(tmp_path, sinks=SINKS, max_entries=3).entries()] == [
        "c",
        "c2",
        "c3",
    ]


def test_critical_alerts_are_never_dropped(tmp_path: Path) -> None:
    """A full outbox of critical alerts grows past its bound (said once); lesser ones go."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=2)
    add(box, make_alert(vm="c1"))
    add(box, make_alert(vm="c2"))
    with capture_logs() as logs:
        add(box, make_alert(vm="c3"))
        add(box, make_alert(vm="c4"))
    assert box.depth() == 4
    assert [r["event"] for r in logs] == ["alert_outbox_over_capacity"]
    with capture_logs() as logs:
        dropped = add(box, make_alert(vm="late", severity="info"))
        resolution = add(box, make_alert(vm="c1"), "resolved", 9.0)
    assert dropped is None
    assert resolution is None
    assert [r["vm"] for r in logs if r["event"] == "alert_dropped"] == ["late", "c1"]
    assert [e.alert.vm for e in box.entries()] == ["c1", "c2", "c3", "c4"]


def test_lowered_bound_applies_on_open(tmp_path: Path) -> None:
    """Reopening with a smaller bound drops by the same rule, durably."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    for vm, sev in (("a", "info"), ("b", "critical"), ("c", "warning"), ("d", "critical")):
        add(box, make_alert(vm=vm, severity=sev))  # type: ignore[arg-type]
    box.close()
    with capture_logs() as logs:
        Outbox(tmp_path, sinks=SINKS, max_entries=2).close()
    assert [r["vm"] for r in logs if r["event"] == "alert_dropped"] == ["a", "c"]
    assert [e.alert.vm for e in Outbox(tmp_path, sinks=SINKS, max_entries=2).entries()] == [
        "b",
        "d",
    ]


def test_no_sinks_queues_nothing(tmp_path: Path) -> None:
    """With no sink configured nothing is owed, but the active set is still kept."""
    box = Outbox(tmp_path, sinks=(), max_entries=10)
    alert = make_alert()
    assert box.add(alert, "firing", 1.0, "k", active=True) is None
    assert box.depth() == 0
    assert box.active() == [alert]
    box.add(alert, "resolved", 2.0, "k2", active=False)
    assert box.active() == []


OPS = st.lists(
    st.tuples(
        st.sampled_from(["critical", "warning", "info"]),
        st.sampled_from(["firing", "resolved"]),
        st.sampled_from(["add", "add", "add", "deliver"]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, bound=st.integers(min_value=1, max_value=6))
def test_drop_rule_invariants(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[Severity, Status, str]],
    bound: int,
) -> None:
    """Whatever arrives: critical firing is never dropped, the bound holds unless only
    critical firing entries remain, and each drop takes the oldest of the lowest class."""
    box = Outbox(tmp_path_factory.mktemp("box"), sinks=("s",), max_entries=bound)
    dropped_keys: set[str] = set()
    for i, (severity, status, op) in enumerate(ops):
        if op == "deliver":
            entry, _ = box.next_for("s", now=1e12)
            if entry is not None:
                box.delivered("s", entry.seq)
            continue
        sev = severity
        before = box.entries()
        new_class = 0 if status == "resolved" or sev == "info" else (1 if sev == "warning" else 2)
        with capture_logs() as logs:
            box.add(make_alert(vm=f"v{i}", severity=sev), status, float(i), f"k{i}")
        drops = [r for r in logs if r["event"] == "alert_dropped"]
        after = box.entries()
        assert len(drops) <= 1
        if drops:
            victim = drops[0]
            dropped_keys.add(victim["key"])
            assert victim["status"] == "resolved" or victim["severity"] != "critical"
            classes = [e.drop_class for e in before] + [new_class]
            lowest = min(classes)
            assert lowest < 2
            candidates = [e.key for e in before if e.drop_class == lowest]
            if new_class == lowest:
                candidates.append(f"k{i}")
            assert victim["key"] == candidates[0]
        assert len(after) <= bound or all(e.drop_class == 2 for e in after)
    box.close()


def test_memory_only_outbox() -> None:
    """Without a state_dir the same rules apply in memory, with nothing written anywhere."""
    box = Outbox(None, sinks=("s",), max_entries=1)
    assert not box.durable
    first = add(box, make_alert(vm="a", severity="info"))
    assert first is not None
    with capture_logs() as logs:
        add(box, make_alert(vm="b"))
    assert [r["event"] for r in logs] == ["alert_dropped"]
    entry, _ = box.next_for("s", now=5.0)
    assert entry is not None
    box.delivered("s", entry.seq)
    assert box.depth() == 0
    box.close()
    assert box.closed


# -- batching: one transaction per loop turn -------------------------------------------------


def statements(box: Outbox) -> list[str]:
    """From now on, every SQL statement `box` runs is appended to the returned list."""
    return sql_statements(box._db)


def keys_on_disk(state_dir: Path) -> list[str]:
    """The entries committed to the outbox database, read through a connection of our own."""
    with contextlib.closing(sqlite3.connect(state_dir / DB_NAME)) as db:
        return [key for (key,) in db.execute("SELECT key FROM entry ORDER BY seq")]


async def test_writes_of_one_loop_turn_are_one_transaction(tmp_path: Path) -> None:
    """An alert storm costs one transaction per loop turn: 100 adds and a failed attempt make
    one COMMIT, in order, on disk once the turn is over and not before."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=1000)
    run = statements(box)
    added = [
        box.add(make_alert(vm=f"vm{i}"), "firing", float(i), f"k{i}", active=True)
        for i in range(100)
    ]
    assert added[0] is not None
    box.failed("webhook:a", added[0].seq, next_at=5.0)
    assert box.depth() == 100  # memory has them at once
    assert keys_on_disk(tmp_path) == []  # the turn is not over

    await wait_until(lambda: len(keys_on_disk(tmp_path)) == 100, what="the turn's commit")
    assert keys_on_disk(tmp_path) == [f"k{i}" for i in range(100)]
    assert [s for s in run if s in ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        attempts = db.execute(
            "SELECT attempts FROM pending WHERE seq = ? AND sink = 'webhook:a'", (added[0].seq,)
        ).fetchone()
        active = db.execute("SELECT COUNT(*) FROM active").fetchone()
    assert attempts == (1,)  # the UPDATE ran after its INSERT
    assert active == (100,)
    box.close()


def test_outside_a_loop_every_write_is_committed_at_once(tmp_path: Path) -> None:
    """Tools and tests without an event loop get today's behaviour: each write is on disk
    when the call returns."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    run = statements(box)
    add(box, make_alert(vm="a"))
    assert len(keys_on_disk(tmp_path)) == 1
    add(box, make_alert(vm="b"))
    assert len(keys_on_disk(tmp_path)) == 2
    assert run.count("COMMIT") == 2
    box.close()


async def test_an_entry_is_on_disk_before_it_is_handed_to_a_sink(tmp_path: Path) -> None:
    """`next_for` (what delivery asks first) commits the turn's writes before it answers, so
    no sink gets an entry a SIGKILL could take out of the journal."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    first = add(box, make_alert(vm="a"))
    add(box, make_alert(vm="b"))
    assert keys_on_disk(tmp_path) == []
    assert box.next_for("webhook:a", now=10.0) == (first, None)
    assert len(keys_on_disk(tmp_path)) == 2
    box.close()


async def test_close_commits_the_queued_writes(tmp_path: Path) -> None:
    """Closing in the same turn as the writes (the shutdown path) commits them; the next run
    finds them."""
    box = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    kept = add(box, make_alert(vm="kept"))
    gone = add(box, make_alert(vm="gone"))
    assert kept is not None
    assert gone is not None
    box.delivered("webhook:a", gone.seq)
    box.delivered("alertmanager:b", gone.seq)
    box.close()
    assert keys_on_disk(tmp_path) == [kept.key]
    again = Outbox(tmp_path, sinks=SINKS, max_entries=10)
    assert [e.key for e in again.entries()] == [kept.key]
    again.close()


KILLED_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from qmpwatch.alerts.outbox import Outbox
from tests.support.alert_fixtures import make_alert

async def main() -> None:
    box = Outbox(Path(sys.argv[1]), sinks=("s",), max_entries=100)
    for i in range(3):
        box.add(make_alert(vm=f"one{i}"), "firing", 1.0, f"turn1-{i}")
    await asyncio.sleep(0)  # the turn ends; its commit callback runs before this task resumes
    for i in range(3):
        box.add(make_alert(vm=f"two{i}"), "firing", 2.0, f"turn2-{i}")
    box.next_for("s", 3.0)  # as a delivery attempt would: commits turn2-*
    box.add(make_alert(vm="late"), "firing", 3.0, "turn2-late")
    os.kill(os.getpid(), signal.SIGKILL)  # in the same turn as turn2-late

asyncio.run(main())
"""


def test_sigkill_loses_at_most_the_writes_of_the_turn_in_progress(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL and restarted finds every entry of the turns before the
    kill and every entry a sink could have been given; only what was added since the last
    commit, in the turn the kill cut short, is gone."""
    state = tmp_path / "state"
    run_until_sigkill(KILLED_CHILD, str(state))
    again = Outbox(state, sinks=("s",), max_entries=100)
    assert [e.key for e in again.entries()] == [
        "turn1-0",
        "turn1-1",
        "turn1-2",
        "turn2-0",
        "turn2-1",
        "turn2-2",
    ]
    again.close()


async def test_a_failed_commit_is_logged_once_and_alerts_still_go_out(tmp_path: Path) -> None:
    """When the turn's commit fails (the database is full), one `alert_outbox_write_failed`
    names the writes it held, and every alert still reaches the sink, from memory."""
    count = 40
    async with receiving() as receiver:
        config = AlertConfig(
            webhook=(WebhookConfig(receiver.url, timeout_s=2.0),),
            retry_initial_s=0.05,
            retry_max_s=0.2,
        )
        dispatcher = AlertDispatcher(config, tmp_path, host="test-host")
        db = dispatcher.outbox._db
        assert db is not None
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # not one page more: a full disk
        with capture_logs() as logs:
            for i in range(count):
                dispatcher.fire(make_alert(vm=f"vm{i}", details={"pad": "x" * 500}))
            async with running(dispatcher):
                await receiver.wait_for(lambda r: len(r.delivered) == count, what="every alert")
    failed = [r for r in logs if r["event"] == "alert_outbox_write_failed"]
    assert len(failed) == 1, failed
    assert failed[0]["op"] == "add"
    assert failed[0]["writes"] == count
    assert failed[0]["path"] == str(tmp_path / DB_NAME)
    assert "full" in failed[0]["error"]
    assert len({r.json()["idempotency_key"] for r in receiver.delivered}) == count
    assert keys_on_disk(tmp_path) == []
