"""Epoch time -> ISO 8601 UTC with microseconds (`2010-02-01T17:10:30.450486Z`), fast.

The one time formatter: QEMU's event timestamps, log records and alert payloads all use it.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Whole-second part of recent timestamps: datetime + strftime cost more than the rest of an
# event's handling, and a storm's events share their seconds. Cleared when full.
_SECOND_STAMPS: dict[int, str] = {}
_SECOND_STAMPS_MAX = 256
_DIGITS3 = tuple(f"{n:03d}" for n in range(1000))  # the microseconds, three digits at a time


def iso_utc(seconds: int, microseconds: int) -> str:
    """Epoch timestamp -> ISO 8601 UTC with microseconds, e.g. 2010-02-01T17:10:30.450486Z."""
    stamp = _SECOND_STAMPS.get(seconds)
    if stamp is None:
        stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if len(_SECOND_STAMPS) >= _SECOND_STAMPS_MAX:
            _SECOND_STAMPS.clear()
        _SECOND_STAMPS[seconds] = stamp
    if 0 <= microseconds < 1_000_000:  # two table look-ups beat formatting with "06d"
        return f"{stamp}.{_DIGITS3[microseconds // 1000]}{_DIGITS3[microseconds % 1000]}Z"
    return f"{stamp}.{microseconds:06d}Z"


def iso_from_epoch(now: float) -> str:
    """Epoch seconds (a float) -> ISO 8601 UTC with microseconds, rounded to the microsecond."""
    seconds = int(now)
    micro = round((now - seconds) * 1_000_000)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    return iso_utc(seconds, micro)  # caches the whole-second part
