"""CPU time and resident memory of a process, from /proc (Linux)."""

from __future__ import annotations

import os

MIB = 1024 * 1024


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (VmRSS)."""
    return _status_kib(pid, "VmRSS:") * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Highest resident set size so far (VmHWM)."""
    return _status_kib(pid, "VmHWM:") * 1024


def _status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time of every thread of the process so far, from schedstat (nanoseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9
