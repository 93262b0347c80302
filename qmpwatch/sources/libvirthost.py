"""One `[[libvirt]]` connection: its domains, each watched as a VM through a `DomainLink`.

`LibvirtConnection.run` connects (read-write: a read-only connection may not receive QEMU's
events), registers for every QMP event of every domain and for lifecycle events, and hands
each running domain whose name matches `domains` to its VM's session. A domain started later
gets its link when libvirt says it started (its first events, sent while it was starting,
are kept for it); a domain that stops ends its link, with the cause `libvirtlink` explains;
one that is undefined leaves (its alerts resolve). A domain that ends cleanly leaves too and
comes back when started again; one that crashed stays, its alert firing, until then.

When libvirtd goes away (the close callback), every link ends as `closed` and the connection
is made again after a capped backoff; then every domain is resynced: a running one gets a new
link (its session reports what changed while nobody watched), one that stopped meanwhile is
reported gone.

No libvirt call runs on the daemon's loop: events come from libvirt's event thread, calls go
through the connection's own lane, each with a deadline, and a libvirtd that stops answering
is reported (`qmpwatch.sources.libvirtthread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu
import structlog

from qmpwatch.aio.lanes import Lane
from qmpwatch.core.backoff import Backoff, FailureLog
from qmpwatch.core.config import ConnectConfig, LibvirtConfig, RemediateConfig
from qmpwatch.session.link import LinkInfo
from qmpwatch.session.session import VmSession
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.libvirtlink import (
    EVENT_STARTED,
    EVENT_STOPPED,
    EVENT_UNDEFINED,
    DomainLink,
    end_cause_of,
    libvirt_words,
)
from qmpwatch.sources.libvirtthread import (
    CALL_TIMEOUT_S,
    Crossing,
    Responsiveness,
    start_event_thread,
)

KEEPALIVE_INTERVAL_S = 5  # libvirtd silent for interval * (count + 1) s: the connection ends
KEEPALIVE_COUNT = 2
HEALTHY_CONNECTION_S = 5.0  # a connection this long resets the backoff
FAILURE_LOG_INTERVAL_S = 60.0
CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}
READ_ONLY_HELP = (
    "libvirt gives qmpwatch a read-only connection, and a read-only connection may not "
    "receive QEMU's events (virConnectDomainQemuMonitorEventRegister): run qmpwatch as root, "
    "or give its user read-write access to libvirt's socket (the unit's "
    "SupplementaryGroups=libvirt, or a polkit rule granting org.libvirt.unix.manage)"
)


class LibvirtRefused(Exception):
    """A connection to libvirt could not be made or used; `reason` is a stable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def register_monitor_events(conn: Any, callback: Callable[..., None]) -> int:
    """Subscribe `conn` to every QMP event of every domain (this never taints a domain);
    LibvirtRefused says why not, with what to grant when the connection is read-only."""
    try:
        return int(libvirt_qemu.qemuMonitorEventRegister(conn, None, None, callback, None, 0))
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED:
            raise LibvirtRefused("read_only", READ_ONLY_HELP) from None
        raise LibvirtRefused("error", libvirt_words(err)) from None


def open_connection(uri: str) -> Any:
    """A read-write connection to `uri`. When libvirt refuses it but would give a read-only
    one, the refusal says what to grant (a read-only one would not carry QEMU's events)."""
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        words = libvirt_words(err)
        refused = err.get_error_code() in (
            libvirt.VIR_ERR_AUTH_FAILED,
            libvirt.VIR_ERR_AUTH_CANCELLED,
            libvirt.VIR_ERR_AUTH_UNAVAILABLE,
            libvirt.VIR_ERR_OPERATION_DENIED,
        ) or any(s in words for s in ("ermission denied", "uthentication", "polkit"))
        if not refused:
            raise LibvirtRefused("unreachable", words) from None
    try:
        libvirt.openReadOnly(uri).close()
    except libvirt.libvirtError:
        raise LibvirtRefused("permission", words) from None
    raise LibvirtRefused("read_only", f"{words}; {READ_ONLY_HELP}")


@dataclass(slots=True)
class _Domain:
    """A watched domain: its VM's session, its link (made when first seen, started when the
    domain is up) and the task that watches it."""

    name: str
    session: VmSession
    link: DomainLink | None = None
    task: asyncio.Task[None] | None = None
    unseen: bool = False  # its link ended with the connection: what happened is unknown
    undefined: bool = False


class LibvirtConnection:
    """One libvirt URI, connected for as long as qmpwatch runs."""

    def __init__(
        self,
        entry: LibvirtConfig,
        host: SessionHost,
        connect: ConnectConfig,
        claim: Callable[[str, LibvirtConnection], bool],
        listed: Callable[[LibvirtConnection, set[str]], None],
    ) -> None:
        """`claim(name, self)`: whether this connection may watch the VM of that name (no
        other [[libvirt]] entry does); `listed`: the wanted domains found at a connect."""
        self.entry = entry
        self.host = host
        self.connect = connect
        self._claim = claim
        self._listed = listed
        self.kind = "libvirt"
        self.log = structlog.get_logger().bind(uri=entry.uri)
        self.domains: dict[str, _Domain] = {}
        self._conn: Any = None
        self._lost: asyncio.Future[str] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._conflicts: set[str] = set()
        self._lane = Lane(f"libvirt {entry.uri}")
        self._crossing: Crossing | None = None
        self.answers = Responsiveness(
            self._lane,
            lambda: self.entry,
            host.source_alert,
            self._recovered,
            lambda: self._conn,
        )

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in this connection's lane (a thread), within CALL_TIMEOUT_S:
        LaneTimeout (a TimeoutError) when libvirtd does not answer by then."""
        return await self._lane.call(self._answered, fn, *args, timeout=CALL_TIMEOUT_S)

    def _answered(self, fn: Callable[..., Any], *args: Any) -> Any:
        """In the lane: `fn(*args)`; a result (not an error) means libvirtd answers."""
        result = fn(*args)
        self.answers.answer()
        return result

    def running(self, name: str) -> bool:
        """Whether the domain `name` is watched through a live link now."""
        domain = self.domains.get(name)
        return domain is not None and domain.task is not None and not domain.task.done()

    def wanted(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.entry.domains)

    # -- the connection -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, watch, reconnect: until cancelled (the VMs' sessions stay open)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.answers.run(), name=f"libvirt-answers:{self.entry.uri}")
                await self._connect_forever()
        finally:
            self.answers.close()
            self._lane.stop()

    def leave_all(self, reason: str) -> None:
        """The entry is gone from the configuration: every VM it held leaves."""
        for name in list(self.domains):
            self._leave(name, reason)

    async def _connect_forever(self) -> None:
        start_event_thread()
        self._crossing = Crossing(asyncio.get_running_loop(), self._events_dropped)
        backoff = Backoff(self.connect.backoff_initial_s, self.connect.backoff_max_s)
        failures = FailureLog(FAILURE_LOG_INTERVAL_S)
        connections = 0
        while True:
            try:
                # No deadline here: an open waits as long as libvirtd does; meanwhile the
                # lane is busy, which `self.answers` reports (degraded, then an alert).
                future = self._lane.submit(self._open)
                conn, callback_ids, version = await asyncio.wrap_future(future)
            except LibvirtRefused as err:
                self.answers.answer()  # libvirtd, or the lack of it, answered
                delay = backoff.next()
                if failures.failed(err.reason, time.monotonic()):
                    level = "error" if err.reason in ("read_only", "permission") else "warning"
                    getattr(self.log, level)(
                        "libvirt_connect_failed",
                        reason=err.reason,
                        error=err.detail,
                        attempts=failures.attempts,
                        retry_in_s=round(delay, 3),
                    )
                await asyncio.sleep(delay)
                continue
            failures.succeeded()
            started = time.monotonic()
            connections += 1
            self.answers.answer()
            why = await self._watch(conn, callback_ids, version, reconnect=connections > 1)
            self.log.warning("libvirt_disconnected", error=why)
            if time.monotonic() - started >= HEALTHY_CONNECTION_S:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    def _open(self) -> tuple[Any, tuple[int, int], str]:
        """In the lane: connect, subscribe, and read libvirt's version."""
        conn = open_connection(self.entry.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            qmp_id = register_monitor_events(conn, self._qmp_event_thread)
            try:
                life_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle_thread, None
                )
                conn.registerCloseCallback(self._close_thread, None)
            except libvirt.libvirtError as err:
                raise LibvirtRefused("error", libvirt_words(err)) from None
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise
        return conn, (qmp_id, int(life_id)), _version(conn)

    async def _watch(
        self, conn: Any, callback_ids: tuple[int, int], version: str, *, reconnect: bool
    ) -> str:
        """Watch the domains of `conn` until it is lost; why it was."""
        self._conn = conn
        self._lost = asyncio.get_running_loop().create_future()
        try:
            try:
                found = await self._resync()
            except libvirt.libvirtError as err:  # the connection broke at once
                return f"listing the domains failed: {libvirt_words(err)}"
            except TimeoutError as err:
                return f"listing the domains failed: {err}"
            self.log.info(
                "libvirt_connected",
                domains=sorted(found),
                reconnect=reconnect,
                libvirt_version=version,
            )
            self._listed(self, found)
            return await self._lost
        finally:
            why = self._lost.result() if self._lost.done() else None
            error = f"lost the connection to libvirtd ({why})" if why else "qmpwatch is stopping"
            self._conn, self._lost = None, None
            for domain in self.domains.values():
                if domain.link is not None and domain.task is not None:
                    domain.unseen = True
                    domain.link.end("closed", error)
                elif domain.link is not None:
                    domain.link = None  # seen starting, never up
            self._lane.submit(_drop, conn, callback_ids)  # not awaited: it may hang too

    def _on_close(self, _conn: Any, reason: int) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(CLOSE_REASONS.get(reason, f"reason {reason}"))

    def _recovered(self) -> None:
        """libvirtd answers again after a stall: resync every domain (what happened
        meanwhile is reported as after a restart of libvirtd)."""
        if self._conn is not None and self._tg is not None:
            self._tg.create_task(self._resync_quietly())

    async def _resync_quietly(self) -> None:
        """A resync that may fail (the connection went meanwhile: its own end resyncs)."""
        try:
            if self._conn is not None:
                await self._resync()
        except (libvirt.libvirtError, TimeoutError):
            pass
        except Exception as err:  # a bug must not end the connection's task group
            self.log.error("internal_error", error=repr(err), where="libvirt resync")

    def _events_dropped(self, dropped: int) -> None:
        """QMP events were dropped at the crossing: read every domain's status again."""
        self.log.warning("libvirt_events_dropped", dropped=dropped)
        for domain in self.domains.values():
            if self.running(domain.name):
                domain.session.request_status()

    # -- domains --------------------------------------------------------------------------------

    async def _resync(self) -> set[str]:
        """Hand every running wanted domain a new link; report the ones that stopped while
        their link was down. The wanted domains found, running or not."""
        found: set[str] = set()
        running: set[str] = set()
        conn = self._conn
        listed = await self.call(self._list, conn, 0)
        if conn is not self._conn:
            raise libvirt.libvirtError("the connection ended while its domains were listed")
        for dom, name, active in listed:
            found.add(name)
            if active:
                running.add(name)
                self._domain_up(dom, settle=True)
        for name, domain in list(self.domains.items()):
            if name in running or not domain.unseen:
                continue
            domain.unseen = False
            why = "stopped" if name in found else "gone"
            domain.session.absent(
                "missing", f"the domain {why} while qmpwatch could not reach libvirtd"
            )
            if name not in found:
                self._leave_when_quiet(domain, "libvirt no longer has the domain")
        return found

    def _list(self, conn: Any, flags: int) -> list[tuple[Any, str, bool]]:
        """In the lane: (domain, name, running) of every wanted domain."""
        found = []
        for dom in conn.listAllDomains(flags):
            name = dom.name()
            if self.wanted(name):
                found.append((dom, name, bool(dom.isActive())))
        return found

    def retarget(self, entry: LibvirtConfig) -> None:
        """New `domains` globs: VMs no longer matched leave; newly matched domains come."""
        self.entry = entry
        for name in list(self.domains):
            if not self.wanted(name):
                self._leave(name, "no longer matched by its [[libvirt]] entry's domains")
        if self._conn is not None and self._tg is not None:
            self._tg.create_task(self._add_matched(self._conn))

    async def _add_matched(self, conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError, TimeoutError):
            active = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
            for dom, _, _ in await self.call(self._list, conn, active):
                if conn is not self._conn:
                    return  # the connection went meanwhile: the next one lists them
                self._domain_up(dom, settle=False)

    def _domain(self, name: str) -> _Domain | None:
        """The watched domain `name`, its session opened when new; None: not ours to watch."""
        domain = self.domains.get(name)
        if domain is not None:
            return domain
        if not self._claim(name, self):
            return None
        session = self.host.open(
            name, self.kind, no_shutdown=True, remediate=RemediateConfig()
        )  # no QMP via libvirt: it taints
        if session is None:
            if name not in self._conflicts:
                self._conflicts.add(name)
                self.log.warning(
                    "libvirt_name_conflict", vm=name, held_by=self.host.holder(name) or ""
                )
            return None
        domain = self.domains[name] = _Domain(name, session)
        return domain

    def _pending_link(self, dom: Any, domain: _Domain, *, settle: bool) -> DomainLink:
        if domain.link is None or domain.link.ended:
            info = LinkInfo(
                where=f"{self.entry.uri} domain {domain.name}",
                qemu_version="",
                no_shutdown=True,  # libvirt always runs QEMU with -no-shutdown
                extra={"uuid": dom.UUIDString(), "domain_id": dom.ID()},
            )
            domain.link = DomainLink(dom, info, settle=settle, call=self.call)
        return domain.link

    def _domain_up(self, dom: Any, *, settle: bool) -> None:
        """The domain runs: watch it (once per run of its QEMU)."""
        domain = self._domain(dom.name())
        if domain is None:
            return
        if self.running(domain.name) and domain.link is not None and not domain.link.ended:
            return  # already watched
        link = self._pending_link(dom, domain, settle=settle)
        assert self._tg is not None
        domain.unseen = False
        after = domain.task
        domain.task = self._tg.create_task(self._watch_domain(domain, link, after))

    async def _watch_domain(
        self, domain: _Domain, link: DomainLink, after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await asyncio.wait([after])  # one link at a time per session
        session = domain.session
        if session.links == 0:
            self.log.info("vm_added", vm=domain.name)
        await session.watch_link(link)
        if domain.task is not asyncio.current_task() or domain.unseen:
            return  # a newer link took over, or the connection went: nothing is known
        if domain.undefined or session.watch.status == "shutdown":
            why = "undefined from libvirt" if domain.undefined else "its domain ended"
            self._leave(domain.name, why)

    def _leave_when_quiet(self, domain: _Domain, reason: str) -> None:
        """A domain libvirt no longer has: it leaves unless an alert still fires for it (a
        crash stays visible until the domain runs again or is undefined)."""
        if not domain.session.watch.firing:
            self._leave(domain.name, reason)

    def _leave(self, name: str, reason: str) -> None:
        domain = self.domains.pop(name, None)
        if domain is None:
            return
        task = domain.task
        if task is None or task.done():
            self.log.info("vm_removed", vm=name, reason=reason)
            self.host.close(name, reason)
            return
        task.cancel()

        def ended(_: asyncio.Task[None]) -> None:
            if name not in self.domains:
                self.log.info("vm_removed", vm=name, reason=reason)
                self.host.close(name, reason)

        task.add_done_callback(ended)

    # -- libvirt's callbacks, in its event thread: each crosses to the loop ----------------------

    def _qmp_event_thread(
        self,
        _conn: Any,
        dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        _opaque: object,
    ) -> None:
        assert self._crossing is not None
        self._crossing.event(self._on_qmp_event, dom, event, seconds, micros, details, time.time())

    def _lifecycle_thread(
        self, _conn: Any, dom: Any, event: int, detail: int, _opaque: object
    ) -> None:
        assert self._crossing is not None
        self._crossing.always(self._on_lifecycle, dom, event, detail)

    def _close_thread(self, conn: Any, reason: int, _opaque: object) -> None:
        assert self._crossing is not None
        self._crossing.always(self._on_close, conn, reason)

    # -- libvirt's callbacks, on the loop (they must not raise) ---------------------------------

    def _on_qmp_event(
        self,
        dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        now: float,
    ) -> None:
        try:
            name = dom.name()
            domain = self.domains.get(name)
            if domain is None:
                if not self.wanted(name):
                    return
                domain = self._domain(name)
                if domain is None:
                    return
            link = domain.link
            if link is None or link.ended:
                if domain.task is not None and not domain.task.done():
                    return  # the old link is ending; this belongs to no run yet
                link = self._pending_link(dom, domain, settle=False)
            link.feed(event, seconds, micros, details, now)
        except Exception as err:  # a bug must not reach libvirt's dispatcher
            self.log.error("internal_error", error=repr(err), where="libvirt QMP event")

    def _on_lifecycle(self, dom: Any, event: int, detail: int) -> None:
        try:
            name = dom.name()
            if event == EVENT_STARTED:
                if self.wanted(name):
                    self._domain_up(dom, settle=False)
                return
            domain = self.domains.get(name)
            if domain is None:
                return
            if event == EVENT_STOPPED:
                if domain.link is not None:
                    if domain.task is None or domain.task.done():
                        domain.link = None  # seen starting, never up
                    else:
                        domain.link.end(*end_cause_of(detail))
                if domain.task is None or domain.task.done():
                    self._leave_when_quiet(domain, "its domain ended")
            elif event == EVENT_UNDEFINED:
                domain.undefined = True
                if domain.task is None or domain.task.done():
                    self._leave(name, "undefined from libvirt")
        except Exception as err:
            self.log.error("internal_error", error=repr(err), where="libvirt lifecycle event")


def _drop(conn: Any, callback_ids: tuple[int, int]) -> None:
    """Deregister and close; a connection already gone refuses, which changes nothing."""
    qmp_id, life_id = callback_ids
    with contextlib.suppress(libvirt.libvirtError):
        libvirt_qemu.qemuMonitorEventDeregister(conn, qmp_id)
    with contextlib.suppress(libvirt.libvirtError):
        conn.domainEventDeregisterAny(life_id)
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _version(conn: Any) -> str:
    try:
        v = int(conn.getLibVersion())
    except libvirt.libvirtError:
        return ""
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
