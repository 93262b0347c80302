"""The watch core: everything qmpwatch decides about one VM, as a pure state machine.

`VmWatch` (vmwatch.py) is the one facade the session and `replay` feed; the parts it calls
each own one concern: alertbook, runstate, followups, incidents, storage, resume, oneshot,
with the event table in handlers.py and the timers, in their fixed order, in timers.py
(docs/architecture.md, "The watch").
"""

from qmpwatch.core.watch.handlers import HANDLERS, Handler, with_handlers
from qmpwatch.core.watch.output import WatchOutput
from qmpwatch.core.watch.runstate import clean_end_words
from qmpwatch.core.watch.storage import DiskInfo
from qmpwatch.core.watch.vmwatch import ABSENT_KINDS, RAW_LIMIT, VmWatch

__all__ = [
    "ABSENT_KINDS",
    "HANDLERS",
    "RAW_LIMIT",
    "DiskInfo",
    "Handler",
    "VmWatch",
    "WatchOutput",
    "clean_end_words",
    "with_handlers",
]
