"""The event table: which part handles which event, in a fixed order per event."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qmpwatch.core import agent as agent_port
from qmpwatch.core.events import Event
from qmpwatch.core.watch import followups, oneshot, runstate, storage

if TYPE_CHECKING:
    from qmpwatch.core.watch.vmwatch import VmWatch

Handler = Callable[["VmWatch", Event, float], None]

HANDLERS: dict[str, tuple[Handler, ...]] = {
    "STOP": (runstate.on_stop,),
    "RESUME": (runstate.on_resume,),
    "BLOCK_IO_ERROR": (followups.track_followups,),
    "SHUTDOWN": (runstate.on_shutdown, followups.track_followups),
    "RESET": (runstate.on_reset, followups.track_followups),
    "WATCHDOG": (oneshot.on_watchdog, followups.track_followups),
    "GUEST_PANICKED": (oneshot.on_guest_panicked, followups.track_followups),
    "GUEST_CRASHLOADED": (oneshot.on_guest_crashloaded,),
    "BLOCK_IMAGE_CORRUPTED": (oneshot.on_image_corrupted,),
    "MEMORY_FAILURE": (oneshot.on_memory_failure,),
    "BLOCK_JOB_ERROR": (oneshot.on_block_job_error,),
    "MIGRATION": (oneshot.on_migration,),
    "BLOCK_WRITE_THRESHOLD": (storage.on_write_threshold,),
    "VSERPORT_CHANGE": (agent_port.on_vserport_change,),
}


def with_handlers(extra: Mapping[str, tuple[Handler, ...]]) -> dict[str, tuple[Handler, ...]]:
    """The default table plus `extra` handlers (run after the default ones)."""
    table = dict(HANDLERS)
    for name, handlers in extra.items():
        table[name] = table.get(name, ()) + handlers
    return table
