"""qmpwatch's benchmark suite: `python -m bench` (or `make bench`); see bench/RESULTS.md.

stream      the realistic event mix, as the bytes QEMU 7.2 writes (deterministic)
fakeqmp     the fake QMP endpoints: one process serving many unix sockets
dialin      a fake QEMU dialing in to a [[listen]] socket (a small process per VM)
procstat    CPU and RSS of a process, from /proc
consumers   floor / stock qemu.qmp / qmpwatch on the same stream (run as child processes)
scale       1,000 VMs watched by one `qmpwatch run` process
sources     1,000 sockets through [[discover]] (beside the old 2 s poll), 200 QEMUs dialing in
polling     `qmpwatch run` with the 2 s glob rescan put back (for `sources`)
fairness    a STOP on one VM while another floods: time to log line and alert handover
memory      1,000,000 events through one session: RSS before and after
logbatch    CPU per log record by records per loop turn (why LineWriter copies lines)
"""

import asyncio
import sys
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


def qemu_lookalike(directory: Path) -> Path:
    """A link to this Python named `qemu-system-x86_64`, made in `directory`/bin.

    The daemon takes a `[[listen]]` peer for QEMU by its program name. Started through the
    link, Python's argv[0] (and so `/proc/PID/cmdline`) is the link's path. Python finds its
    prefix from where the link is: beside a virtualenv's `pyvenv.cfg` it is that virtualenv,
    so when this Python is one, `directory` becomes a copy of it made of links (its
    `pyvenv.cfg`, and `lib` pointing at its packages).
    """
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "qemu-system-x86_64"
    if not link.exists():
        link.symlink_to(sys.executable)
    if sys.prefix != sys.base_prefix and not (directory / "pyvenv.cfg").exists():
        venv = Path(sys.prefix)
        (directory / "pyvenv.cfg").write_bytes((venv / "pyvenv.cfg").read_bytes())
        (directory / "lib").symlink_to(venv / "lib")
    return link
