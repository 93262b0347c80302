"""qmpwatch: watch QEMU QMP monitors, log every event, check follow-ups, raise alerts."""

from __future__ import annotations

__version__ = "0.1.0"
