"""The suite's contract check (tests/support/contract.py): the README's tables as it reads them,
its judgement, and the rule that only a whole run is judged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import contract
from tests.support.contract import RunShape, allowlist, documented, judge, partial_run

README = contract.README.read_text(encoding="utf-8")
WHOLE = RunShape(
    args=("tests",),
    keyword="",
    markexpr="",
    last_failed=False,
    deselected=0,
    collected=900,
    finished=900,
    stopped=False,
    collect_only=False,
)


def test_every_contract_table_of_the_readme_is_read() -> None:
    """Each table yields its kinds: records (both lists), alerts, resolutions, refusals,
    metrics and degraded reasons; a one-shot alert has no resolution."""
    keys = documented(README).documented
    for key in [
        ("record", "qmp_event"),
        ("record", "listen_name_conflict"),  # the table's last row
        ("record", "daemon_started"),  # "Daemon records:"
        ("record", "alert_dispatcher_stopped"),  # "Alert delivery records:"
        ("alert", "vm_stopped_io_error"),
        ("alert", "storage_space_low"),
        ("resolution", "vm_disk_filling"),
        ("resolution", "removed from the configuration"),
        ("resolution", "no longer discovered (its socket is gone)"),
        ("refusal", "no_pidfd"),
        ("metric", "qmpwatch_events_total"),
        ("metric", "qmpwatch_degraded"),
        ("degraded", "sink_failing"),
    ]:
        assert key in keys, key
    assert ("resolution", "watchdog_fired") not in keys
    assert ("record", "vms") not in keys  # a key in parentheses, not a record kind
    assert ("refusal", "no_greeting") not in keys  # "such as": vm_connect_failed's own reasons


def test_the_allowlist_parses_and_names_only_documented_kinds() -> None:
    """Every allow-list line is TABLE NAME: REASON and names a kind the README documents."""
    allowed = allowlist(contract.ALLOWLIST.read_text(encoding="utf-8"))
    assert all(reason for reason in allowed.values())
    assert set(allowed) <= documented(README).documented


def test_a_bad_allowlist_line_is_named() -> None:
    """A line without a reason is refused with its line number."""
    with pytest.raises(ValueError, match=r":2: not 'TABLE NAME: REASON'"):
        allowlist("# comment\nalert vm_memory_failure\n")


def test_the_judgement_names_each_kind_and_its_table() -> None:
    """Unproduced, undocumented, fake-only and stale allow-listed kinds each get a line that
    names the kind and the README table to look at."""
    known = contract.Contract(
        {
            ("record", "vm_gone"),
            ("alert", "vm_crashed"),
            ("metric", "qmpwatch_outbox_depth"),
            ("refusal", "gone"),
            ("alert", "vm_memory_failure"),
        },
        also_refusals={"no_greeting"},
    )
    produced = {
        ("record", "vm_gone"): {"real": "t1"},
        ("alert", "vm_crashed"): {"fake": "t2", "replay": "t3"},
        ("alert", "vm_memory_failure"): {"replay": "t4"},
        ("metric", "qmpwatch_outbox_depth"): {"live": "t5"},
        ("metric", "qmpwatch_new_total"): {"live": "t6"},
        ("refusal", "no_greeting"): {"real": "t7"},
        ("record", "brand_new"): {"real": "t8"},
    }
    allowed = {("alert", "vm_memory_failure"): "replay only", ("alert", "gone_kind"): "x"}
    problems = judge(known, produced, allowed)
    assert problems == [
        "produced only by a fake or replay (fake in t2, replay in t3), not allow-listed: alert "
        f"`vm_crashed` ({contract.TABLES['alert']}; list it in contract-allowlist.txt with the "
        "reason real QEMU/libvirt/systemd cannot produce it, or produce it for real)",
        f"documented but produced by no test: refusal `gone` ({contract.TABLES['refusal']})",
        "produced but not documented: metric `qmpwatch_new_total` (first by t6; add it to "
        f"{contract.TABLES['metric']})",
        "produced but not documented: record `brand_new` (first by t8; add it to "
        f"{contract.TABLES['record']})",
        "allow-listed but not documented: alert `gone_kind` (contract-allowlist.txt)",
    ]
    assert "## The log contract" in contract.TABLES["record"]


def test_a_histograms_series_count_for_its_documented_name() -> None:
    """`qmpwatch_event_lag_seconds_bucket` produces the documented histogram."""
    known = contract.Contract({("metric", "qmpwatch_event_lag_seconds")})
    produced = {("metric", "qmpwatch_event_lag_seconds_bucket"): {"real": "t"}}
    assert judge(known, produced, {}) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"args": (".",)}, None),
        ({"args": ("tests/output/test_logs.py",)}, "only tests/output/test_logs.py selected"),
        ({"args": ("tests/cli",)}, "only tests/cli selected"),
        ({"args": ("tests::x",)}, "only tests::x selected"),
        ({"keyword": "disk"}, "-k 'disk'"),
        ({"markexpr": "qemu"}, "-m 'qemu'"),
        ({"last_failed": True}, "--lf/--sw"),
        ({"deselected": 3}, "3 tests deselected"),
        ({"finished": 12}, "stopped early (12 of 900 tests ran)"),
        ({"stopped": True}, "stopped early (900 of 900 tests ran)"),
        ({"collect_only": True}, "--collect-only"),
    ],
)
def test_only_a_whole_run_is_judged(change: dict[str, object], reason: str | None) -> None:
    """`make test` (all of tests/, every test run) is judged; -k, a file, a directory, -m,
    deselection, --lf and an early stop are partial runs, with the reason said."""
    shape = RunShape(**{**WHOLE.__dict__, **change})
    assert partial_run(shape) == reason


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """An inner pytest run of this suite, outside this run's contract collection."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QMPWATCH_CONTRACT_")}
    clean.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        check=False,
        cwd=contract.ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_partial_run_passes_and_says_it_was_not_judged() -> None:
    """One file with -k: the run passes, and says the contract check did not judge it."""
    done = _pytest("tests/contract/test_contract_check.py", "-k", "bad_allowlist_line")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "contract check: not judged, not the whole suite "
        "(only tests/contract/test_contract_check.py selected)" in done.stdout
    )


def test_a_judged_run_fails_naming_what_no_daemon_produced(tmp_path: Path) -> None:
    """A run judged without the tests that produce `vm_stuck_transient` and the rest fails,
    naming each unproduced kind and its table, and names what its daemons did produce."""
    dump = tmp_path / "dump.txt"
    done = _pytest(
        "tests/service/test_daemon_started.py",
        QMPWATCH_CONTRACT_JUDGE="always",
        QMPWATCH_CONTRACT_DUMP=str(dump),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "contract check FAILED" in done.stdout
    assert (
        f"documented but produced by no test: alert `vm_stuck_transient` "
        f"({contract.TABLES['alert']})" in done.stdout
    )
    assert (
        'record "daemon_started": live (tests/service/test_daemon_started.py::' in dump.read_text()
    )
    assert "produced by no test: record `daemon_started`" not in done.stdout
