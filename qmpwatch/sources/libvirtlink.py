"""`DomainLink`: a link to one libvirt domain's QEMU, made of what libvirt forwards.

libvirt owns the domain's monitor. qmpwatch never sends QMP through it (libvirt would taint
the domain `custom-monitor`): events come from `virConnectDomainQemuMonitorEventRegister`,
which forwards every QMP event of every domain untouched (QEMU's own timestamp, `data`
re-serialised as a JSON string), and the run status comes from `virDomainGetState`, whose
(state, reason) pairs map onto the words of `query-status` (`STATUS_WORDS`).

A domain has no monitor socket of its own, hence no end of file: the link ends when the
source says so, from libvirt's lifecycle events (`end_cause_of`):

- stopped / failed (QEMU killed or died) and stopped / crashed end it with `eof`: QEMU went
  away, and with no SHUTDOWN before that the core raises `vm_crashed`;
- stopped / shutdown, destroyed, saved, migrated and from-snapshot end it with `exited`: QEMU
  ended on purpose (a guest shutdown, `virsh destroy`, a save or a migration), a clean end
  whatever events came first (a destroy that escalates to SIGKILL sends no SHUTDOWN);
- a lost connection to libvirtd ends it with `closed`: nothing is known about QEMU, and the
  next link's resync reports what changed meanwhile.

No libvirt call runs on the daemon's loop: the state is read in the connection's lane (a
thread of its own), with a deadline (`call`, from `qmpwatch.sources.libvirthost`); a
libvirtd that does not answer in time is a `query-status` that timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import libvirt
import orjson

from qmpwatch.core.errors import DecodeError
from qmpwatch.session.link import (
    CommandFailed,
    EndCause,
    LinkCallbacks,
    LinkClosed,
    LinkInfo,
    StatusRefused,
)

EARLY_LIMIT = 256  # events kept for a domain before its link starts (more are dropped)

# virDomainState and its reasons, as libvirt-python names them (VIR_DOMAIN_<STATE>_<REASON>);
# tests/sources/test_libvirt_states.py checks every number against the installed libvirt-python.
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)

# (state, reason) -> the query-status word QEMU would answer; a reason missing here (a newer
# libvirt) takes its state's default (the None key). None: no word (unknown, or no QEMU).
STATUS_WORDS: dict[int, dict[int | None, str | None]] = {
    NOSTATE: {None: None},  # 0 unknown
    RUNNING: {
        None: "running",  # 0 unknown, 1 booted, 2 migrated, 3 restored, 4 from_snapshot,
        # 5 unpaused, 6 migration_canceled, 7 save_canceled, 8 wakeup, 9 crashed (the guest
        # crashed and runs on), 10 postcopy, 11 postcopy_failed
    },
    BLOCKED: {None: "running"},  # 0 unknown: blocked on a resource, not stopped
    PAUSED: {
        None: "paused",  # a reason newer than this table
        0: "paused",  # unknown
        1: "paused",  # user: virsh suspend, or a monitor client's stop
        2: "finish-migrate",  # migration: paused for an offline migration
        3: "finish-migrate",  # save: being saved to a file (a migration to a file)
        4: "paused",  # dump: paused while its memory is dumped
        5: "io-error",  # ioerror: a disk error with error_policy='stop'
        6: "watchdog",  # watchdog: <watchdog action='pause'/>
        7: "paused",  # from_snapshot: restored from a snapshot, paused
        8: "shutdown",  # shutting_down: the guest shut down (libvirt runs -no-shutdown)
        9: "save-vm",  # snapshot: paused while a snapshot is taken
        10: "guest-panicked",  # crashed: the guest panicked, on_crash=preserve
        11: "prelaunch",  # starting_up: QEMU started with -S, not yet resumed
        12: "postmigrate",  # postcopy: paused in the post-copy phase of a migration
        13: "postmigrate",  # postcopy_failed: post-copy failed (a stuck-state alert follows)
    },
    SHUTDOWN: {None: "running"},  # 0 unknown, 1 user: being shut down, the guest still runs
    SHUTOFF: {None: None},  # 0-8: no QEMU (shutdown, destroyed, crashed, migrated, saved, ...)
    CRASHED: {None: "guest-panicked"},  # 0 unknown, 1 panicked: QEMU kept, CPUs stopped
    PMSUSPENDED: {None: "suspended"},  # 0 unknown: the guest is in S3 (disk: gone, S4)
}

# Lifecycle events (virDomainEventType) and the details of STOPPED.
EVENT_DEFINED, EVENT_UNDEFINED, EVENT_STARTED, EVENT_STOPPED = 0, 1, 2, 5
STOPPED_WORDS = {
    0: "shutdown",
    1: "destroyed",
    2: "crashed",
    3: "migrated",
    4: "saved",
    5: "failed",
    6: "from_snapshot",
}
STOPPED_CRASHES = frozenset({2, 5})  # crashed (QEMU crashed) and failed (killed, died)


def status_word(state: int, reason: int) -> str | None:
    """The query-status word for libvirt's (state, reason); None: unknown or no QEMU."""
    words = STATUS_WORDS.get(state)
    if words is None:
        return None
    return words.get(reason, words[None])


def end_cause_of(detail: int) -> tuple[EndCause, str]:
    """How a link ends when libvirt says the domain stopped with `detail`."""
    word = STOPPED_WORDS.get(detail, f"reason {detail}")
    if detail in STOPPED_CRASHES or detail not in STOPPED_WORDS:
        return "eof", f"libvirt: the domain stopped ({word}): QEMU went away"
    return "exited", f"libvirt: the domain stopped ({word})"


def libvirt_words(err: libvirt.libvirtError) -> str:
    """A libvirt error as a sentence for a record."""
    message = err.get_error_message() or str(err)
    return message.strip()


def link_gone(err: libvirt.libvirtError, dom: Any) -> bool:
    """Whether `err` says the domain's QEMU or the connection to libvirtd is gone (rather
    than a call libvirt refused)."""
    if err.get_error_code() in (
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_OPERATION_INVALID,  # "domain is not running"
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_NO_CONNECT,
    ):
        return True
    try:
        return not dom.connect().isAlive()
    except libvirt.libvirtError:
        return True


class DomainLink:
    """One running domain, watched through libvirt until its QEMU stops or libvirtd goes."""

    def __init__(
        self,
        dom: Any,
        info: LinkInfo,
        *,
        settle: bool,
        call: Callable[..., Awaitable[Any]],
    ) -> None:
        """`settle`: wait for libvirt to finish reconnecting to QEMU before the first state
        read (after a restart of libvirtd its state is the one saved before, for a while);
        `call(fn, *args)`: `fn(*args)` off the loop, with a deadline."""
        self.dom = dom
        self._call = call
        self.info = info
        self._settle = settle
        self._callbacks: LinkCallbacks | None = None
        self._early: list[tuple[dict[str, Any], float] | DecodeError] = []
        self._end: tuple[EndCause, str] | None = None
        self._ended = asyncio.Event()

    # -- what the source feeds in ---------------------------------------------------------------

    def feed(self, event: str, seconds: int, micros: int, details: str | None, now: float) -> None:
        """One QMP event of the domain, as libvirt forwarded it."""
        if self._end is not None:
            return
        try:
            data = orjson.loads(details) if details is not None else {}
        except orjson.JSONDecodeError as err:
            self._deliver(DecodeError(f"data: not JSON ({err})", details or ""))
            return
        obj = {
            "event": event,
            "data": data,
            "timestamp": {"seconds": seconds, "microseconds": micros},
        }
        self._deliver((obj, now))

    def _deliver(self, item: tuple[dict[str, Any], float] | DecodeError) -> None:
        callbacks = self._callbacks
        if callbacks is None:
            if len(self._early) < EARLY_LIMIT:
                self._early.append(item)
        elif isinstance(item, DecodeError):
            callbacks.on_decode_error(item)
        else:
            callbacks.on_event(*item)

    def end(self, cause: EndCause, error: str) -> None:
        """The domain's QEMU stopped, or the connection is gone: the link ends."""
        if self._end is None:
            self._end = (cause, error)
            self._ended.set()

    @property
    def ended(self) -> bool:
        return self._end is not None

    # -- the Link protocol ----------------------------------------------------------------------

    def start(self, callbacks: LinkCallbacks) -> None:
        self._callbacks = callbacks
        early, self._early = self._early, []
        for item in early:
            self._deliver(item)

    async def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Nothing is sent to QEMU through libvirt: a QMP command there taints the domain
        (`custom-monitor`). So no query-block and no remediation for libvirt domains."""
        raise CommandFailed(f"{command}: qmpwatch sends no QMP through libvirt (it taints)")

    async def domain_xml(self) -> str:
        """The domain's XML, for its protections (reading it does not taint the domain)."""
        try:
            return str(self.dom.XMLDesc(0))
        except libvirt.libvirtError as err:
            raise LinkClosed(libvirt_words(err)) from None

    async def query_status(self) -> str:
        if self._end is not None:
            raise LinkClosed(self._end[1] or "the link has ended")
        settle, self._settle = self._settle, False
        answer = await self._call(_read_state, self.dom, settle)
        if isinstance(answer, LinkClosed | StatusRefused):
            raise answer
        state, reason = answer
        if self._callbacks is not None:
            self._callbacks.on_reply()  # events after this point are newer than the answer
        word = status_word(state, reason)
        if word is not None:
            return word
        if state == SHUTOFF:
            raise LinkClosed("libvirt says the domain is shut off")
        raise StatusRefused(f"libvirt reports no state for the domain ({state}, {reason})")

    async def wait_closed(self) -> tuple[EndCause, str]:
        await self._ended.wait()
        assert self._end is not None
        return self._end

    async def close(self) -> tuple[EndCause, str]:
        self.end("closed", "")
        assert self._end is not None
        return self._end


def _read_state(dom: Any, settle: bool) -> tuple[int, int] | LinkClosed | StatusRefused:
    """In the connection's lane: the domain's (state, reason), or why there is none.

    With `settle`, first wait until libvirt has reconnected to the domain's QEMU. After a
    restart, libvirtd reconnects to each QEMU under a job and updates the saved state at its
    end; `virDomainMemoryStats` takes a query job, so it returns only then (it reads the
    balloon, when the domain has one, through libvirt's own monitor: no taint)."""
    try:
        if settle:
            with contextlib.suppress(libvirt.libvirtError):  # the state read says what is wrong
                dom.memoryStats()
        state, reason = dom.state()
    except libvirt.libvirtError as err:
        if link_gone(err, dom):
            return LinkClosed(libvirt_words(err))
        return StatusRefused(f"libvirt: {libvirt_words(err)}")
    return int(state), int(reason)
