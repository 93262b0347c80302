"""The daemon: start-up, the main loop, reload on SIGHUP, graceful shutdown with a deadline.

start-up   load config (refuse to start on a bad one), configure logs, open the state
           store, start the configured sources (supervisor)
main loop  wait for a signal: SIGHUP reloads (an invalid new config is refused with one
           clear record and the old one keeps running), SIGTERM/SIGINT stop
shutdown   cancel every task; sessions close cleanly within SHUTDOWN_DEADLINE_S;
           a second SIGTERM/SIGINT exits at once
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import structlog

from qmpwatch import __version__
from qmpwatch.aio.commits import JOURNALS
from qmpwatch.aio.lanes import Lane
from qmpwatch.alerts.dispatch import AlertDispatcher
from qmpwatch.alerts.links import links_for
from qmpwatch.core.alert import Alert
from qmpwatch.core.config import Config, DaemonConfig, NoShutdown, VmConfig, load_config
from qmpwatch.core.errors import ConfigError
from qmpwatch.output import logs
from qmpwatch.service import sdnotify, statestore
from qmpwatch.service.endpoints import keep_listening
from qmpwatch.service.health import Degradation
from qmpwatch.service.httpserver import Health, HttpServer
from qmpwatch.service.metrics import Metrics
from qmpwatch.service.recorder import Services
from qmpwatch.service.stallwatch import Watched, watch_lanes
from qmpwatch.service.statestore import StateStore
from qmpwatch.service.status import FOLLOWERS_MAX, RecordTap, snapshot
from qmpwatch.service.supervisor import Supervisor

SHUTDOWN_DEADLINE_S = 5.0
LOG_DRAIN_S = 2.0  # at exit: how long the last lines may take to reach the log
ALERT_FLUSH_DEADLINE_S = 3.0  # last delivery attempts on shutdown; the rest waits
STATUS_INTERVAL_S = 1.0
# Open files qmpwatch needs beside one socket per VM: stdio, the event loop, the state and
# outbox databases (3 files each), the HTTP listener and its clients, sink connections, an
# exec sink's pipes, /proc reads. Measured near 25; the rest is margin.
FD_HEADROOM = 64
API_MAX_CONNECTIONS = FOLLOWERS_MAX + 32  # `qmpwatch tail`s and `qmpwatch status`es at once


class Daemon:
    """One run of `qmpwatch run`."""

    def __init__(self, config: Config, config_path: Path | None, writer: logs.LineWriter) -> None:
        self.config = config
        self.config_path = config_path
        self.writer = writer
        self.log = structlog.get_logger()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._signals = 0
        self._supervisor: Supervisor | None = None
        self._degradation: Degradation | None = None
        self._unbound: dict[str, str] = {}  # an endpoint that cannot listen: degraded reason
        self._dispatcher: AlertDispatcher | None = None

    def _on_stop_signal(self, signame: str) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("daemon_forced_exit", signal=signame)
            self.writer.flush()
            self.writer.drain(LOG_DRAIN_S / 4)
            os._exit(1)
        self.log.info("daemon_stopping", signal=signame)
        self._stop.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        state_dir = self.config.daemon.state_dir
        daemon_cfg = self.config.daemon
        log_lane = Lane("log")
        # Lines are written in a thread of their own: a log nobody reads never stalls the loop.
        self.writer.offload(log_lane, daemon_cfg.log_backlog_bytes)
        log_target = "journald" if daemon_cfg.log_target == "journal" else "stdout"
        stalls = [
            Watched(log_lane, "journal_blocked", daemon_cfg.log_file or log_target, "a log write"),
            Watched(JOURNALS, "state_store_slow", state_dir or "memory", "a SQLite commit"),
        ]
        if statestore.flush_all not in self.writer.before_write:
            # The alert outbox and the state store commit a turn's writes before its lines.
            self.writer.before_write.append(statestore.flush_all)
        store = StateStore(Path(state_dir) if state_dir else None)
        if store.problem:
            self.log.error("state_store_unavailable", error=store.problem)
        metrics = Metrics()
        dispatcher = self._dispatcher = AlertDispatcher(
            self.config.alert,
            Path(state_dir) if state_dir else None,
            host=self.config.alert.host,
            on_result=metrics.alert_delivery,
            links=links_for(self.config.alert, self.config.daemon.metrics_listen),
        )
        restored: dict[str, list[Alert]] = {}
        for alert in dispatcher.firing_alerts():
            restored.setdefault(alert.vm, []).append(alert)
        metrics.outbox_depth_from(dispatcher.depth)
        self._degradation = Degradation(
            store,
            dispatcher,
            lambda: self.config.alert.degraded_after_sink_failing_s,
            unbound=self._unbound,  # an endpoint that cannot listen now: metrics_unbound
        )
        metrics.registry.register(self._degradation)
        status_changed = asyncio.Event()
        tap = RecordTap()
        services = Services(
            store=store,
            alerts=dispatcher,
            metrics=metrics,
            restored=restored,
            changed=status_changed.set,
            tap=tap,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                endpoints, tried = self._endpoints(tg, metrics, dispatcher.host, tap)
                await asyncio.gather(*(event.wait() for event in tried))  # bound, or said why
                supervisor = Supervisor(self.config, services, tg)
                self._supervisor = supervisor
                metrics.vms_from(supervisor.metric_views)
                supervisor.apply()  # opens the sessions; their tasks run from the next await
                self.log.info(
                    "daemon_started",
                    version=__version__,
                    config=str(self.config_path or ""),
                    vms=len(supervisor.sessions),  # what /healthz counts: every source's
                    discover=[d.glob for d in self.config.discover],
                )
                check_fd_limit(len(supervisor.sessions), self.log, self._clients())
                supervisor.resolve_orphans()
                sdnotify.ready(sdnotify.status_line(*supervisor.counts()))
                delivery = tg.create_task(dispatcher.run(), name="alert-delivery")
                background = [
                    tg.create_task(self._reload_forever(supervisor, dispatcher), name="reload"),
                    tg.create_task(sdnotify.keep_alive(), name="watchdog"),
                    tg.create_task(self._status_forever(supervisor, status_changed), name="status"),
                    tg.create_task(watch_lanes(stalls), name="stall-watch"),
                ]
                await self._stop.wait()
                sdnotify.stopping()
                for task in (*background, *endpoints):
                    task.cancel()
                try:
                    async with asyncio.timeout(SHUTDOWN_DEADLINE_S):
                        await supervisor.stop_all()
                except TimeoutError:
                    self.log.warning("daemon_shutdown_deadline_passed")
                await dispatcher.aclose(ALERT_FLUSH_DEADLINE_S)
                await delivery
        finally:
            store.close()
            self.log.info("daemon_stopped")
            self.writer.flush()
            self.writer.drain(LOG_DRAIN_S)
            self.writer.lane = None  # what is logged at exit (a library's last words) at once
            log_lane.stop()
        return 0

    def _endpoints(
        self, tg: asyncio.TaskGroup, metrics: Metrics, host: str, tap: RecordTap
    ) -> tuple[list[asyncio.Task[None]], list[asyncio.Event]]:
        """The HTTP endpoints, each kept listening (or trying to) by a task of its own, and
        the events set once each has made its first attempt."""
        daemon = self.config.daemon

        def server(listen: str, **options: Any) -> Callable[[], HttpServer]:
            status = lambda: self._status(host, tap.count)  # noqa: E731
            return lambda: HttpServer(listen, metrics, self._health, status=status, **options)

        # (name, server, degraded reasons, level of the record when it cannot listen)
        wanted: list[tuple[str, Callable[[], HttpServer], dict[str, str], str]] = []
        if daemon.metrics_listen:
            tcp = server(
                daemon.metrics_listen,
                hosts=daemon.metrics_hosts,
                max_connections=daemon.metrics_max_connections,
            )
            wanted.append(("metrics", tcp, self._unbound, "error"))
        if daemon.api_socket:
            api = server(
                daemon.api_socket,
                tap=tap,
                unix_group=daemon.api_group,
                max_connections=API_MAX_CONNECTIONS,
            )
            # Without it status and tail cannot ask, but alerts go on: not degraded; a warning
            # (e.g. run by hand, without the unit's RuntimeDirectory=).
            wanted.append(("api", api, {}, "warning"))
        tasks, tried = [], []
        for name, make, degraded, level in wanted:
            tried.append(asyncio.Event())
            serving = keep_listening(
                make,
                listening=f"{name}_listening",
                failed=f"{name}_listen_failed",
                degraded=degraded,
                reason=f"{name}_unbound",
                level=level,
                tried=tried[-1],
            )
            tasks.append(tg.create_task(serving, name=f"http:{name}"))
        return tasks, tried

    def _clients(self) -> int:
        daemon = self.config.daemon
        return (daemon.metrics_max_connections if daemon.metrics_listen else 0) + (
            API_MAX_CONNECTIONS if daemon.api_socket else 0
        )

    def _status(self, host: str, followers: int) -> dict[str, Any]:
        """The status document of `qmpwatch status` (`qmpwatch.service.status`)."""
        held = self._supervisor.watched() if self._supervisor is not None else []
        sinks = self._dispatcher.sink_report() if self._dispatcher is not None else []
        degraded = self._degradation.reasons() if self._degradation is not None else {}
        return snapshot(host, held, time.time(), followers, sinks, degraded)

    def _health(self) -> Health:
        if self._supervisor is None or self._degradation is None:
            return Health(False, {"reason": "starting"})
        vms, connected, firing = self._supervisor.counts()
        detail = {"vms": vms, "connected": connected, "alerts_firing": firing}
        return Health(True, detail, degraded=self._degradation.reasons())

    async def _status_forever(self, supervisor: Supervisor, changed: asyncio.Event) -> None:
        """Keep systemd's STATUS= line current: sent when it changes, at most once per
        `STATUS_INTERVAL_S` (a storm of pauses is one update), and never woken while idle."""
        last = ""
        while True:
            await changed.wait()
            changed.clear()
            line = sdnotify.status_line(*supervisor.counts())
            if line != last:
                sdnotify.status(line)
                last = line
                await asyncio.sleep(STATUS_INTERVAL_S)

    async def _reload_forever(self, supervisor: Supervisor, dispatcher: AlertDispatcher) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self.config_path is None:
                continue
            sdnotify.reloading()
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as err:
                self.log.error(
                    "config_reload_refused", config=str(self.config_path), problems=err.problems
                )
            else:
                changed = changed_keys(self.config, config)
                if config.alert != self.config.alert:
                    links = links_for(config.alert, config.daemon.metrics_listen)
                    changed += dispatcher.reconfigure(config.alert, links)
                daemon_keys = [key for key in changed if key.startswith("daemon.")]
                if daemon_keys:
                    self.log.warning(
                        "config_reload_partial",
                        keys=daemon_keys,
                        detail="[daemon] is read at start-up: restart qmpwatch to apply it",
                    )
                self.config = config
                supervisor.apply(config)
                check_fd_limit(len(supervisor.sessions), self.log, self._clients())
                self.log.info(
                    "config_reloaded",
                    config=str(self.config_path),
                    vms=supervisor.counts()[0],  # as status and /healthz count them
                    changed=sorted(dict.fromkeys(changed)),
                )
            sdnotify.ready(sdnotify.status_line(*supervisor.counts()))


_SINK_LISTS = ("webhook", "alertmanager", "exec")  # compared sink by sink by the dispatcher


def changed_keys(old: Config, new: Config) -> list[str]:
    """The configuration keys whose values differ (sections of VMs by their section name;
    alert sinks are left to `AlertDispatcher.reconfigure`)."""
    changed: list[str] = []
    for section in dataclasses.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        if before == after:
            continue
        if not dataclasses.is_dataclass(before):
            changed.append("vm" if section.name == "vms" else section.name)  # VMs come and go
            continue
        changed += [
            f"{section.name}.{key.name}"
            for key in dataclasses.fields(before)
            if key.name not in _SINK_LISTS and getattr(before, key.name) != getattr(after, key.name)
        ]
    return changed


def check_fd_limit(vms: int, log: structlog.typing.FilteringBoundLogger, clients: int = 0) -> None:
    """Fit RLIMIT_NOFILE to `vms` sockets plus FD_HEADROOM: raise the soft limit, or say why not.

    The soft limit goes up to the hard limit when it is below what is needed (`fd_limit_raised`,
    info). A hard limit below the need is `fd_limit_too_low` (error): the VMs beyond it get
    `vm_connect_failed` with reason `fd_limit` and are retried, the others are watched.
    `clients`: the most HTTP clients the endpoints let in at once (their caps), kept apart so
    that no number of them takes a VM's descriptor.
    """
    needed = vms + FD_HEADROOM + clients
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    new_soft = needed if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    except (ValueError, OSError):
        new_soft = soft
    fields = {"soft": soft, "hard": hard, "new_soft": new_soft, "needed": needed, "vms": vms}
    if new_soft >= needed:
        log.info("fd_limit_raised", **fields)
        return
    log.error(
        "fd_limit_too_low",
        summary=(
            f"RLIMIT_NOFILE allows {new_soft} open files, but {vms} VMs need {needed} (a socket "
            f"each, plus {FD_HEADROOM} for qmpwatch itself): VMs beyond the limit are not "
            "watched; raise LimitNOFILE= in the systemd unit (or ulimit -n)"
        ),
        **fields,
    )


def _open_log(path: str) -> IO[bytes]:
    if not path:
        return sys.stdout.buffer
    return open(path, "ab")  # lives as long as the daemon


def _run_loop(main: Daemon) -> int:
    faulthandler.enable()  # a watchdog SIGABRT of a stuck loop leaves tracebacks in the journal
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main.main())
    return uvloop.run(main.main())


def run_tail(sockets: list[str], *, json: bool, no_shutdown: NoShutdown) -> int:
    """`qmpwatch tail`: the daemon on the given sockets, no sinks, state kept in memory."""
    vms: list[VmConfig] = []
    names: set[str] = set()
    for path in sockets:
        name = stem = Path(path).stem or path
        n = 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.add(name)
        vms.append(VmConfig(name, path, no_shutdown))
    daemon = DaemonConfig(state_dir="", metrics_listen="", api_socket="")  # asked by nobody
    config = Config(daemon=daemon, vms=tuple(vms))
    writer = logs.configure("json" if json else "console", sys.stdout.buffer)
    with contextlib.suppress(KeyboardInterrupt):
        return _run_loop(Daemon(config, None, writer))
    return 130


def run_daemon(config_path: Path, *, log_format: str | None = None) -> int:
    """`qmpwatch run`: returns the process exit status."""
    try:
        config = load_config(config_path)
    except ConfigError as err:
        print(f"{config_path}: invalid configuration, not starting:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    fmt = log_format or config.daemon.log_format
    stream: IO[bytes]
    if config.daemon.log_target == "journal":
        from qmpwatch.output import journal

        fmt = "json"  # each entry has the record's JSON and its console line
        try:
            stream = journal.open_stream()
        except OSError as err:
            print(
                f"daemon.log_target: cannot reach journald at {journal.SOCKET}: "
                f"{err.strerror or err}",
                file=sys.stderr,
            )
            return 2
    else:
        try:
            stream = _open_log(config.daemon.log_file)
        except OSError as err:
            print(
                f"daemon.log_file: cannot open {config.daemon.log_file}: {err.strerror}",
                file=sys.stderr,
            )
            return 2
    writer = logs.configure("console" if fmt == "console" else "json", stream)
    with contextlib.suppress(KeyboardInterrupt):
        return _run_loop(Daemon(config, config_path, writer))
    return 130
