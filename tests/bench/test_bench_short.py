"""The benchmark's short run (`python -m bench --quick`) as a load test: what must hold however
busy the machine is.

One run of the benchmark in a child process (fake QMP endpoints in others), about half a
minute, under the load it makes itself. The suite checks behaviour only: every VM connected,
identified, none refused, nothing lost under a flood, clean stops, memory that stays flat. No
speed, latency or CPU figure is asserted here: on a loaded two-core machine those move with
the load, not with the code. Their targets (per-event CPU against the floor and stock qemu.qmp,
connect times, idle CPU, the flood's p99) are held by `make bench` (`python -m bench`, which
exits 1 when one is missed), measured side by side in the full run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 1.3  # the same as bench.__main__.QUICK.margin (RSS: a short run's noise)


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    """The JSON result of one `python -m bench --quick` run."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.stdout, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_many_vms_connect_in_little_memory_and_stop_cleanly(quick: dict[str, Any]) -> None:
    """Every VM connects; RSS extrapolates under 150 MiB at 1,000; SIGTERM stops it cleanly."""
    s = quick["scale"]
    assert s["connected"] == s["vms"], s
    at_1000_mib = s["rss_before_mib"] + 1000 * s["rss_per_vm_kib"] / 1024
    assert at_1000_mib <= 150.0 * MARGIN, s
    assert s["stopped_cleanly"], s


def test_every_event_through_a_listen_and_a_dialed_session_is_logged(
    quick: dict[str, Any],
) -> None:
    """Every round of the per-event run saw all its events (the run fails otherwise) through
    each consumer: the floor, stock qemu.qmp, the daemon dialed and dialed in to."""
    t = quick["throughput"]
    rounds = {mode: len(per_event) for mode, per_event in t["per_event_us"].items()}
    assert rounds == dict.fromkeys(("floor", "stock", "path", "qmpwatch", "listen"), 5), t


def test_discovered_sockets_all_connect_and_stop_cleanly(quick: dict[str, Any]) -> None:
    """Every socket found through [[discover]] connects; SIGTERM stops the daemon cleanly."""
    d = quick["discover"]
    assert d["connected"] == d["vms"], d
    assert d["stopped_cleanly"], d


def test_vms_dialing_in_are_identified_and_connected(quick: dict[str, Any]) -> None:
    """Fake QEMUs dialing in to one [[listen]] socket are all identified by their -name and
    connected; none is refused."""
    ls = quick["listen"]
    assert ls["connected"] == ls["vms"], ls
    assert ls["identified"], ls
    assert ls["refused"] == 0, ls
    assert ls["stopped_cleanly"], ls


def test_a_flood_on_one_vm_loses_no_stop_on_another(quick: dict[str, Any]) -> None:
    """While one VM floods, every STOP of another is logged and alerted, and every flood
    event is logged."""
    f = quick["fairness"]
    assert f["missing"] == 0, f
    assert f["flood_events_logged"] >= f["flood_events"], f


def test_memory_stays_flat_through_a_long_session(quick: dict[str, Any]) -> None:
    """Events through one session leave RSS within 10 MiB of where it started."""
    m = quick["memory"]
    assert m["events_logged"] == m["events"] + 1, m
    assert m["growth_mib"] <= 10.0, m
