"""The benchmark's short run (`python -m bench --quick`): the targets hold, with margins.

One run of the benchmark in a child process (fake QMP endpoints in others), about half a
minute. Nothing here is timed against a clock of its own: CPU figures are ratios measured
side by side in the same run, so a slow or busy machine moves all of them together; the
margins (1.3x on each target) absorb the noise of a short run. The full run is `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 1.3  # the same as bench.__main__.QUICK.margin
STOCK_FLOOR = 3.0  # stock qemu.qmp / the daemon, per event, in a quick run (see below)


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


def test_per_event_cpu_is_near_the_floor_and_far_below_stock(quick: dict[str, Any]) -> None:
    """The daemon as wired (decode, handlers, tracker, log line, metrics) costs at most 5x the
    floor per event, and 5x less than stock qemu.qmp receiving alone."""
    t = quick["throughput"]
    assert t["qmpwatch_over_floor"] <= 5.0 * MARGIN, t
    # Stock's cost relative to the daemon's moves with the machine: 5.5-5.9x on 2026-11-21,
    # 4.3-5.3x on 2026-11-29 for the code before and after the sources redesign alike (side by
    # side, bench/RESULTS.md), and a quick run's few events spread it further. `make bench`
    # holds the 5x target; here a regression shows as falling below 3x.
    assert t["stock_over_qmpwatch"] >= STOCK_FLOOR, t


def test_many_vms_connect_fast_in_little_memory_and_idle_quietly(quick: dict[str, Any]) -> None:
    """Every VM connects within 5 s; RSS extrapolates under 150 MiB at 1,000; idle < 1 % CPU."""
    s = quick["scale"]
    assert s["connected"] == s["vms"], s
    assert s["connect_s"] <= 5.0 * MARGIN, s
    at_1000_mib = s["rss_before_mib"] + 1000 * s["rss_per_vm_kib"] / 1024
    assert at_1000_mib <= 150.0 * MARGIN, s
    assert s["idle_cpu_pct"] < 1.0 * MARGIN, s
    assert s["stopped_cleanly"], s


def test_a_vm_dialing_in_costs_what_a_dialed_one_costs_per_event(quick: dict[str, Any]) -> None:
    """A session on a [[listen]] connection costs at most 10 % more CPU per event than a
    dialed one, on the same stream in the same rounds."""
    t = quick["throughput"]
    assert t["listen_over_dial"] <= 1.10 * MARGIN, t


def test_discovered_sockets_connect_fast_and_idle_without_polling(quick: dict[str, Any]) -> None:
    """Sockets found through [[discover]] connect within 5 s; idle under 0.1 % of a core."""
    d = quick["discover"]
    assert d["connected"] == d["vms"], d
    assert d["connect_s"] <= 5.0 * MARGIN, d
    assert d["idle_cpu_pct"] < 0.1 * MARGIN, d
    assert d["stopped_cleanly"], d


def test_vms_dialing_in_are_identified_and_connected_fast(quick: dict[str, Any]) -> None:
    """Fake QEMUs dialing in to one [[listen]] socket are all identified by their -name and
    connected within 5 s of the daemon's start; none is refused."""
    ls = quick["listen"]
    assert ls["connected"] == ls["vms"], ls
    assert ls["identified"], ls
    assert ls["refused"] == 0, ls
    assert ls["connect_s"] <= 5.0 * MARGIN, ls
    assert ls["stopped_cleanly"], ls


def test_a_flood_on_one_vm_does_not_delay_a_stop_on_another(quick: dict[str, Any]) -> None:
    """While one VM floods, another's STOP is logged and its alert handed over within 50 ms."""
    f = quick["fairness"]
    assert f["missing"] == 0, f
    assert f["flood_events_logged"] >= f["flood_events"], f
    assert f["p99_ms"] <= 50.0 * MARGIN, f


def test_memory_stays_flat_through_a_long_session(quick: dict[str, Any]) -> None:
    """Events through one session leave RSS within 10 MiB of where it started."""
    m = quick["memory"]
    assert m["events_logged"] == m["events"] + 1, m
    assert m["growth_mib"] <= 10.0, m
