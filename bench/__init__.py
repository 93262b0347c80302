"""qmpwatch's benchmark suite: `python -m bench` (or `make bench`); see bench/RESULTS.md.

stream      the realistic event mix, as the bytes QEMU 7.2 writes (deterministic)
fakeqmp     the fake QMP endpoints: one process serving many unix sockets
procstat    CPU and RSS of a process, from /proc
consumers   floor / stock qemu.qmp / qmpwatch on the same stream (run as child processes)
scale       1,000 VMs watched by one `qmpwatch run` process
fairness    a STOP on one VM while another floods: time to log line and alert handover
memory      1,000,000 events through one session: RSS before and after
logbatch    CPU per log record by records per loop turn (why LineWriter copies lines)
"""

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent  # the checkout: where `python -m bench...` runs
LOOPS = ("uvloop", "asyncio")  # the choices of every `--loop` option

_T = TypeVar("_T")


def run_on(loop: str, coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` to completion on a new event loop of the kind `loop` names (`LOOPS`)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
