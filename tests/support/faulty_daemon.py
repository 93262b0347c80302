"""`python -m tests.support.faulty_daemon FAULT... -- ARGS`: `qmpwatch ARGS` with steps of its
sources made to raise an unexpected exception (`InjectedFault`) the first time they run for
the given target. A fake only for what real peers cannot produce: a bug in qmpwatch.

FAULT is `STEP` or `STEP:TARGET` (a VM name, or a socket path for listen.accept):

- `listen.accept`   accepting a connection on a [[listen]] socket
- `listen.identify` identifying a peer that dialed in (any peer)
- `listen.reconfigure` the [[listen]] source taking the configuration (start-up, reload)
- `dial.connect`    dialing a [[vm]] or discovered VM's socket (TARGET: the VM)
- `discover.scan`   matching the [[discover]] globs
- `session.resync`  the query-status after a link is up (TARGET: the VM)
- `session.read`    reading a negotiated link (TARGET: the VM)
- `libvirt.connect` opening a [[libvirt]] connection
- `libvirt.crossing` the first QMP event from libvirt's thread counts one event dropped at the
  crossing, as if the loop had fallen EVENTS_BEHIND_MAX behind (it is still delivered)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class InjectedFault(RuntimeError):
    """What a test made a step raise."""


def _once(owner: Any, attr: str, step: str, target: str, key: Callable[..., str]) -> None:
    """Make `owner.attr` raise once when `key(*args)` names `target` (or any, if empty)."""
    original = getattr(owner, attr)
    done = False

    def check(*args: Any, **kwargs: Any) -> None:
        nonlocal done
        if not done and (not target or key(*args, **kwargs) == target):
            done = True
            raise InjectedFault(f"injected fault in {step}")

    if hasattr(original, "__code__") and original.__code__.co_flags & 0x80:  # coroutine

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            return await original(*args, **kwargs)

        setattr(owner, attr, async_wrapper)
    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(owner, attr, wrapper)


def inject(fault: str) -> None:
    """Install one FAULT (see the module's docstring)."""
    from qmpwatch.session.session import VmSession
    from qmpwatch.sources import discover, listen, qmpclient
    from qmpwatch.sources.dial import Dialer

    step, _, target = fault.partition(":")
    if step == "listen.accept":
        _once(listen._Listener, "accept", step, target, lambda self, loop: self.entry.socket)
    elif step == "listen.reconfigure":
        _once(listen.ListenSource, "reconfigure", step, target, lambda self, config: "")
    elif step == "listen.identify":
        _once(listen, "identify", step, target, lambda conn: "")
    elif step == "dial.connect":
        _once(Dialer, "attach", step, target, lambda self: self.target.name)
    elif step == "discover.scan":
        _once(discover, "discover", step, target, lambda globs: "")
    elif step == "session.resync":
        _once(VmSession, "_resync", step, target, lambda self, link: self.name)
    elif step == "session.read":

        def reading(client: Any) -> str:  # only once the session reads the link
            session = getattr(client.on_event, "__self__", None)
            return str(client.name) if isinstance(session, VmSession) else "\0"

        _once(qmpclient.WatchClient, "_do_recv", step, target, reading)
    elif step == "libvirt.connect":
        from qmpwatch.sources import libvirthost

        _once(libvirthost.LibvirtConnection, "_open", step, target, lambda self: "")
    elif step == "libvirt.crossing":
        _count_one_dropped()
    else:
        raise SystemExit(f"faulty_daemon: unknown fault {fault!r}")


def _count_one_dropped() -> None:
    """The first QMP event at libvirt's crossing counts as one dropped (see the docstring)."""
    from qmpwatch.sources import libvirtthread

    original = libvirtthread.Crossing.event
    done = False

    def event(self: libvirtthread.Crossing, fn: Callable[..., None], *args: Any) -> None:
        nonlocal done
        if not done:
            done = True
            with self._lock:
                self._dropped += 1
        original(self, fn, *args)

    libvirtthread.Crossing.event = event  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for fault in argv[:split]:
        inject(fault)
    from qmpwatch.cli.main import main as qmpwatch_main

    sys.argv = ["qmpwatch", *argv[split + 1 :]]
    return qmpwatch_main()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
