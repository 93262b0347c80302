"""Configuration: TOML text -> frozen dataclasses, with errors that name the key.

Pure apart from reading the file and resolving `env:`/`file:` secrets. Every problem is
reported as one line, "key: what is wrong" (for example `connect.timeout_s: expected a
number, got "soon"`), all of them at once; unknown keys are reported too, because a typo in a
deadline is a silent bug otherwise.
"""

from __future__ import annotations

import difflib
import math
import os
import pwd
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from qmpwatch.core.alert import SEVERITIES, ClientStopSeverity
from qmpwatch.core.errors import ConfigError
from qmpwatch.core.protection import GAPS

DEFAULT_PATH = Path("/etc/qmpwatch/config.toml")

NoShutdown = bool | Literal["auto"]
T = TypeVar("T")


class Secret:
    """A value read from `env:NAME` or `file:/path` (or given inline); never shown in full."""

    __slots__ = ("_value", "source")

    def __init__(self, source: str, value: str) -> None:
        self.source = source
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        shown = self.source if self.source.startswith(("env:", "file:")) else "inline"
        return f"Secret({shown})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    log_format: Literal["json", "console"] = "json"
    log_file: str = ""
    state_dir: str = "/var/lib/qmpwatch"
    metrics_listen: str = "127.0.0.1:9752"
    log_target: Literal["stdout", "journal"] = "stdout"
    # `qmpwatch status` and `tail` ask the daemon here (a unix socket, mode 0660); "": none.
    api_socket: str = "/run/qmpwatch/api.sock"
    api_group: str = ""  # the API socket's group; empty: qmpwatch's own
    # Host: values /metrics and /healthz answer; empty: on a loopback metrics_listen,
    # localhost, 127.0.0.1, ::1 and its own host; on any other address, any.
    metrics_hosts: tuple[str, ...] = ()
    metrics_max_connections: int = 64  # concurrent TCP clients; beyond it: 503 and closed
    # Log bytes waiting for a log that is not read (journald stalled) before lines are dropped.
    log_backlog_bytes: int = 16 << 20


@dataclass(frozen=True, slots=True)
class ConnectConfig:
    timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class FollowupConfig:
    stop_after_block_io_error_s: float = 5.0
    stop_after_shutdown_s: float = 5.0
    reset_after_watchdog_s: float = 5.0
    stop_after_watchdog_s: float = 5.0
    shutdown_after_watchdog_s: float = 120.0
    exit_after_watchdog_s: float = 5.0
    stop_after_guest_panicked_s: float = 5.0


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """Crash loops and VMs stuck in a transient state ([lifecycle])."""

    crash_loop_count: int = 3  # incidents (panic, watchdog, crash) within the window
    crash_loop_window_s: float = 600.0
    crash_loop_quiet_s: float = 900.0  # no incident this long: the loop alert resolves
    transient_state_max_s: float = 300.0  # inmigrate, prelaunch, save-vm, ... longer: alert
    agent_absent_after_s: float = 0.0  # 0: off; a running VM's agent port closed longer: alert
    unreachable_after_s: float = 60.0  # not connected this long: vm_unreachable (0: off)


@dataclass(frozen=True, slots=True)
class RemediateConfig:
    """What qmpwatch may do to a VM ([remediate], overridable per [[vm]] / source entry)."""

    resume_after_io_error: bool = False  # try `cont` after an io-error pause
    resume_backoff_initial_s: float = 10.0
    resume_backoff_max_s: float = 300.0
    resume_give_up_after_s: float = 3600.0
    write_threshold_percent: float = 0.0  # 0: off; e.g. 90 arms QEMU's write threshold there
    storage_free_percent: float = 0.0  # 0: off; e.g. 10 warns below 10 % free where images are
    storage_check_interval_s: float = 30.0  # how often that free space is looked at


@dataclass(frozen=True, slots=True)
class VmConfig:
    name: str
    socket: str
    no_shutdown: NoShutdown = "auto"
    remediate: RemediateConfig = field(default_factory=RemediateConfig)


@dataclass(frozen=True, slots=True)
class DiscoverConfig:
    glob: str
    no_shutdown: NoShutdown = "auto"
    remediate: RemediateConfig = field(default_factory=RemediateConfig)
    users: tuple[int, ...] = ()  # uids whose sockets count; empty: root and qmpwatch's own


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """A socket that QEMU dials in to (`-chardev socket,...,reconnect=1 -mon ...`)."""

    socket: str
    group: str = ""  # the socket's group (mode 0660); empty: qmpwatch's own
    no_shutdown: NoShutdown = "auto"
    grace_s: float = 10.0  # a VM watched before a restart, not back by then, is gone
    remediate: RemediateConfig = field(default_factory=RemediateConfig)
    users: tuple[int, ...] = ()  # uids of the QEMUs believed; empty: root and qmpwatch's own


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """A libvirt connection whose domains qmpwatch watches (`[[libvirt]]`)."""

    uri: str = "qemu:///system"
    domains: tuple[str, ...] = ("*",)  # globs of domain names (fnmatch, case-sensitive)
    # libvirtd unresponsive this long: the warning alert `libvirt_unresponsive`
    unresponsive_alert_s: float = 30.0


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    headers: Mapping[str, Secret] = field(default_factory=dict)
    hmac_secret: Secret | None = None
    timeout_s: float = 5.0  # per attempt


@dataclass(frozen=True, slots=True)
class AlertmanagerConfig:
    url: str  # base URL; alerts go to {url}/api/v2/alerts
    timeout_s: float = 5.0  # per attempt
    headers: Mapping[str, Secret] = field(default_factory=dict)
    # Firing alerts are posted again this often; each post says endsAt = now + 4 intervals,
    # so Alertmanager resolves an alert by itself only when qmpwatch stops confirming it.
    resend_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ExecConfig:
    command: tuple[str, ...]
    timeout_s: float = 10.0  # per attempt; then the process group is killed
    env: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AlertConfig:
    client_stop_severity: ClientStopSeverity = "warning"
    host: str = ""  # the `host` of payloads and Alertmanager labels; empty: the hostname
    outbox_max_entries: int = 10000  # undelivered alerts kept; see qmpwatch.alerts.outbox
    retry_initial_s: float = 1.0  # delivery backoff: first retry ...
    retry_max_s: float = 60.0  # ... doubling up to this (jittered)
    # /healthz says "degraded" once a sink has failed every attempt for this long
    degraded_after_sink_failing_s: float = 300.0
    # Where people reach the daemon's HTTP endpoint (Alertmanager's generatorURL, runbook
    # links); empty: http://<host or hostname>:<metrics_listen port>. See qmpwatch.alerts.links.
    external_url: str = ""
    runbook_url: str = ""  # per-kind runbook link, "{kind}" replaced; empty: the daemon's own
    webhook: tuple[WebhookConfig, ...] = ()
    alertmanager: tuple[AlertmanagerConfig, ...] = ()
    exec: tuple[ExecConfig, ...] = ()

    def secrets(self) -> tuple[Secret, ...]:
        """Every secret the sinks use (to keep them out of logs and child environments)."""
        found: list[Secret] = []
        for w in self.webhook:
            found.extend(w.headers.values())
            if w.hmac_secret is not None:
                found.append(w.hmac_secret)
        for a in self.alertmanager:
            found.extend(a.headers.values())
        for e in self.exec:
            found.extend(e.env.values())
        return tuple(found)


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    """Protection gaps the operator accepts ([protection] ignore; [protection.vm.NAME] ignore
    adds to it for one VM). A gap is named in full (`disk_errors_ignored:drive1`) or by its
    kind alone (every disk's)."""

    ignore: tuple[str, ...] = ()
    vms: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (VM name, its own ignore list)

    def ignored_for(self, vm: str) -> tuple[str, ...]:
        own = next((names for name, names in self.vms if name == vm), ())
        return self.ignore + tuple(n for n in own if n not in self.ignore)


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    connect: ConnectConfig = field(default_factory=ConnectConfig)
    followup: FollowupConfig = field(default_factory=FollowupConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    remediate: RemediateConfig = field(default_factory=RemediateConfig)
    alert: AlertConfig = field(default_factory=AlertConfig)
    vms: tuple[VmConfig, ...] = ()
    discover: tuple[DiscoverConfig, ...] = ()
    listen: tuple[ListenConfig, ...] = ()
    libvirt: tuple[LibvirtConfig, ...] = ()
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)


# ---------------------------------------------------------------------------------------------
# Parsing


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class _Reader:
    """Walks one table, collecting "key: problem" lines instead of stopping at the first."""

    def __init__(self, table: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.table = table
        self.path = path
        self.sep = "."  # between path and key; ": " after a VM's "vm[2] web02"
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}{self.sep}{name}" if self.path else name

    def bad(self, name: str, what: str) -> None:
        self.problems.append(f"{self.key(name)}: {what}")

    def get(self, name: str, check: Callable[[str, Any], Any], default: T) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = check(self.key(name), self.table[name])
        return default if value is None else value

    def finish(self, allowed_extra: tuple[str, ...] = ()) -> None:
        known = sorted(self.seen | set(allowed_extra))
        for name in self.table:
            if name not in self.seen and name not in allowed_extra:
                close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problems.append(f"{self.key(name)}: unknown key{hint}")

    # checks: return the value, or record the problem and return None
    def number(
        self, *, minimum: float = 0.0, positive: bool = True
    ) -> Callable[[str, Any], float | None]:
        def check(key: str, value: Any) -> float | None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problems.append(f"{key}: expected a number, got {_show(value)}")
                return None
            if isinstance(value, int) and abs(value) > 2**53:  # math.isfinite would overflow
                self.problems.append(f"{key}: number too large, got {str(value)[:20]}...")
                return None
            if not math.isfinite(value) or (positive and value <= minimum):
                self.problems.append(
                    f"{key}: must be a number greater than {minimum:g}, got {value}"
                )
                return None
            return float(value)

        return check

    def boolean(self) -> Callable[[str, Any], bool | None]:
        def check(key: str, value: Any) -> bool | None:
            if not isinstance(value, bool):
                self.problems.append(f"{key}: expected true or false, got {_show(value)}")
                return None
            return value

        return check

    def integer(self, *, minimum: int = 1) -> Callable[[str, Any], int | None]:
        def check(key: str, value: Any) -> int | None:
            if isinstance(value, bool) or not isinstance(value, int):
                self.problems.append(f"{key}: expected an integer, got {_show(value)}")
                return None
            if value < minimum:
                self.problems.append(f"{key}: must be at least {minimum}, got {value}")
                return None
            return value

        return check

    def string(
        self, *, nonempty: bool = False, choices: tuple[str, ...] = ()
    ) -> Callable[[str, Any], str | None]:
        def check(key: str, value: Any) -> str | None:
            if not isinstance(value, str):
                self.problems.append(f"{key}: expected a string, got {_show(value)}")
                return None
            if nonempty and not value.strip():
                self.problems.append(f"{key}: must not be empty")
                return None
            if choices and value not in choices:
                options = ", ".join(f'"{c}"' for c in choices)
                self.problems.append(f"{key}: expected one of {options}, got {_show(value)}")
                return None
            return value

        return check

    def table_at(self, name: str) -> _Reader:
        self.seen.add(name)
        value = self.table.get(name, {})
        if not isinstance(value, dict):
            self.bad(name, f"expected a table, got {_show(value)}")
            value = {}
        return _Reader(value, self.key(name), self.problems)

    def array_of_tables(self, name: str) -> list[_Reader]:
        self.seen.add(name)
        value = self.table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.bad(
                name, f"expected an array of tables ([[{self.key(name)}]]), got {_show(value)}"
            )
            return []
        return [_Reader(v, f"{self.key(name)}[{i}]", self.problems) for i, v in enumerate(value)]


def _no_shutdown(problems: list[str]) -> Callable[[str, Any], NoShutdown | None]:
    def check(key: str, value: Any) -> NoShutdown | None:
        if isinstance(value, bool) or value == "auto":
            return value  # type: ignore[no-any-return]
        problems.append(f'{key}: expected true, false or "auto", got {_show(value)}')
        return None

    return check


def resolve_secret(key: str, ref: str, problems: list[str]) -> Secret | None:
    """Resolve `env:NAME` or `file:/path` (else the text itself); errors never show a value."""
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in os.environ:
            problems.append(f"{key}: environment variable {name} is not set")
            return None
        return Secret(ref, os.environ[name])
    if ref.startswith("file:"):
        path = Path(ref[5:])
        try:
            return Secret(ref, path.read_text(encoding="utf-8").strip())
        except OSError as err:
            problems.append(f"{key}: cannot read secret file {path}: {err.strerror}")
            return None
        except UnicodeDecodeError:  # its text is the secret: say nothing of it
            problems.append(f"{key}: cannot read secret file {path}: not UTF-8 text")
            return None
    return Secret(ref, ref)


def _strings(problems: list[str]) -> Callable[[str, Any], tuple[str, ...] | None]:
    def check(key: str, value: Any) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problems.append(f"{key}: expected an array of strings, got {_show(value)}")
            return None
        return tuple(value)

    return check


def _users(problems: list[str]) -> Callable[[str, Any], tuple[int, ...] | None]:
    """`users = ["libvirt-qemu", 0]`: user names or uids -> uids (a name must exist)."""

    def check(key: str, value: Any) -> tuple[int, ...] | None:
        if not isinstance(value, list) or not value:
            problems.append(f"{key}: expected a non-empty array of user names or uids")
            return None
        uids: list[int] = []
        for user in value:
            if isinstance(user, int) and not isinstance(user, bool) and 0 <= user < 2**32:
                uids.append(user)
            elif isinstance(user, str) and user.isdigit():
                uids.append(int(user))
            elif isinstance(user, str) and user:
                try:
                    uids.append(pwd.getpwnam(user).pw_uid)
                except KeyError:
                    problems.append(f"{key}: no such user {_show(user)}")
            else:
                problems.append(f"{key}: expected a user name or uid, got {_show(user)}")
        return tuple(uids)

    return check


def _parse_daemon(r: _Reader) -> DaemonConfig:
    d = DaemonConfig()
    log_format: str = r.get("log_format", r.string(choices=("json", "console")), "json")
    log_target: str = r.get("log_target", r.string(choices=("stdout", "journal")), "stdout")
    cfg = DaemonConfig(
        log_format="console" if log_format == "console" else "json",
        log_file=r.get("log_file", r.string(), d.log_file),
        state_dir=r.get("state_dir", r.string(nonempty=True), d.state_dir),
        metrics_listen=r.get("metrics_listen", r.string(), d.metrics_listen),
        log_target="journal" if log_target == "journal" else "stdout",
        api_socket=r.get("api_socket", r.string(), d.api_socket),
        api_group=r.get("api_group", r.string(), d.api_group),
        metrics_hosts=r.get("metrics_hosts", _strings(r.problems), d.metrics_hosts),
        metrics_max_connections=r.get(
            "metrics_max_connections", r.integer(), d.metrics_max_connections
        ),
        log_backlog_bytes=int(
            r.get("log_backlog_bytes", r.number(minimum=4095), d.log_backlog_bytes)
        ),
    )
    _absolute(r, "api_socket", cfg.api_socket)
    if cfg.log_target == "journal" and cfg.log_file:
        r.bad("log_target", 'is "journal": daemon.log_file must be empty (records go to journald)')
    if cfg.metrics_listen:
        host, sep, port = cfg.metrics_listen.rpartition(":")
        if (
            not sep
            or not host
            or not port.isascii()
            or not port.isdigit()
            or not 0 <= int(port) < 65536  # 0: a free port, named in `metrics_listening`
        ):
            r.bad("metrics_listen", f'expected "HOST:PORT" or "", got {_show(cfg.metrics_listen)}')
    r.finish()
    return cfg


def _parse_connect(r: _Reader) -> ConnectConfig:
    d = ConnectConfig()
    cfg = ConnectConfig(
        timeout_s=r.get("timeout_s", r.number(), d.timeout_s),
        backoff_initial_s=r.get("backoff_initial_s", r.number(), d.backoff_initial_s),
        backoff_max_s=r.get("backoff_max_s", r.number(), d.backoff_max_s),
    )
    if cfg.backoff_max_s < cfg.backoff_initial_s:
        r.bad(
            "backoff_max_s", f"must not be less than backoff_initial_s ({cfg.backoff_initial_s:g})"
        )
    r.finish()
    return cfg


def _parse_followup(r: _Reader) -> FollowupConfig:
    d = FollowupConfig()
    values = {name: r.get(name, r.number(), getattr(d, name)) for name in FollowupConfig.__slots__}
    r.finish()
    return FollowupConfig(**values)


def _parse_lifecycle(r: _Reader) -> LifecycleConfig:
    d = LifecycleConfig()
    cfg = LifecycleConfig(
        crash_loop_count=r.get("crash_loop_count", r.integer(minimum=2), d.crash_loop_count),
        crash_loop_window_s=r.get("crash_loop_window_s", r.number(), d.crash_loop_window_s),
        crash_loop_quiet_s=r.get("crash_loop_quiet_s", r.number(), d.crash_loop_quiet_s),
        transient_state_max_s=r.get("transient_state_max_s", r.number(), d.transient_state_max_s),
        agent_absent_after_s=r.get(
            "agent_absent_after_s", r.number(minimum=0.0, positive=False), d.agent_absent_after_s
        ),
        unreachable_after_s=r.get(
            "unreachable_after_s", r.number(positive=False), d.unreachable_after_s
        ),
    )
    r.finish()
    return cfg


def _parse_remediate(r: _Reader, base: RemediateConfig) -> RemediateConfig:
    """[remediate] keys on top of `base` (the defaults, or [remediate] in an entry)."""
    cfg = RemediateConfig(
        resume_after_io_error=r.get(
            "resume_after_io_error", r.boolean(), base.resume_after_io_error
        ),
        resume_backoff_initial_s=r.get(
            "resume_backoff_initial_s", r.number(), base.resume_backoff_initial_s
        ),
        resume_backoff_max_s=r.get("resume_backoff_max_s", r.number(), base.resume_backoff_max_s),
        resume_give_up_after_s=r.get(
            "resume_give_up_after_s", r.number(), base.resume_give_up_after_s
        ),
        write_threshold_percent=r.get(
            "write_threshold_percent",
            r.number(minimum=0.0, positive=False),
            base.write_threshold_percent,
        ),
        storage_free_percent=r.get(
            "storage_free_percent",
            r.number(minimum=0.0, positive=False),
            base.storage_free_percent,
        ),
        storage_check_interval_s=r.get(
            "storage_check_interval_s", r.number(), base.storage_check_interval_s
        ),
    )
    for key in ("storage_free_percent",):
        value = getattr(cfg, key)
        if not 0 <= value < 100:
            r.bad(key, f"must be 0 (off) or a percentage below 100, got {value:g}")
    if not 0 <= cfg.write_threshold_percent < 100:
        r.bad(
            "write_threshold_percent",
            f"must be 0 (off) or a percentage below 100, got {cfg.write_threshold_percent:g}",
        )
    if cfg.resume_backoff_max_s < cfg.resume_backoff_initial_s:
        r.bad(
            "resume_backoff_max_s",
            f"must not be less than resume_backoff_initial_s ({cfg.resume_backoff_initial_s:g})",
        )
    return cfg


def _parse_vms(
    readers: list[_Reader], problems: list[str], remediate: RemediateConfig
) -> tuple[VmConfig, ...]:
    vms: list[VmConfig] = []
    names: dict[str, str] = {}
    for r in readers:
        r.sep = ": "  # problems name the VM: "vm[2] web02: socket: ..."
        name = r.get("name", r.string(nonempty=True), "")
        if name:
            r.path = f"{r.path} {name}"
        socket = r.get("socket", r.string(nonempty=True), "")
        _absolute(r, "socket", socket)
        no_shutdown: NoShutdown = r.get("no_shutdown", _no_shutdown(problems), "auto")
        for required in ("name", "socket"):
            if required not in r.table:
                r.bad(required, "missing (required)")
        if name and name in names:
            r.bad("name", f"duplicate VM name {_show(name)} (also {names[name]})")
        names.setdefault(name, r.path)
        own = _parse_remediate(r, remediate)
        r.finish()
        vms.append(VmConfig(name=name, socket=socket, no_shutdown=no_shutdown, remediate=own))
    return tuple(vms)


def _absolute(r: _Reader, name: str, path: str) -> None:
    """Socket paths must be absolute: a relative one would depend on the daemon's working
    directory (/ under systemd), so it is a mistake wherever it is found."""
    if path and not os.path.isabs(path):
        r.bad(name, f"must be an absolute path, got {_show(path)}")


def _parse_discover(
    readers: list[_Reader], problems: list[str], remediate: RemediateConfig
) -> tuple[DiscoverConfig, ...]:
    out: list[DiscoverConfig] = []
    for r in readers:
        glob = r.get("glob", r.string(nonempty=True), "")
        _absolute(r, "glob", glob)
        if "glob" not in r.table:
            r.bad("glob", "missing (required)")
        no_shutdown: NoShutdown = r.get("no_shutdown", _no_shutdown(problems), "auto")
        own = _parse_remediate(r, remediate)
        users = r.get("users", _users(problems), ())
        r.finish()
        out.append(DiscoverConfig(glob, no_shutdown, own, users))
    return tuple(out)


def _parse_listen(
    readers: list[_Reader], problems: list[str], remediate: RemediateConfig
) -> tuple[ListenConfig, ...]:
    out: list[ListenConfig] = []
    seen: set[str] = set()
    for r in readers:
        path = r.get("socket", r.string(nonempty=True), "")
        if "socket" not in r.table:
            r.bad("socket", "missing (required)")
        elif path and not os.path.isabs(path):
            r.bad("socket", f"must be an absolute path, got {_show(path)}")
        elif path in seen:
            r.bad("socket", f"{_show(path)} is already a [[listen]] socket")
        seen.add(path)
        group = r.get("group", r.string(), "")
        no_shutdown: NoShutdown = r.get("no_shutdown", _no_shutdown(problems), "auto")
        grace = r.get("grace_s", r.number(), 10.0)
        own = _parse_remediate(r, remediate)
        users = r.get("users", _users(problems), ())
        r.finish()
        out.append(ListenConfig(path, group, no_shutdown, grace, own, users))
    return tuple(out)


def _gap_names(problems: list[str]) -> Callable[[str, Any], tuple[str, ...] | None]:
    def check(key: str, value: Any) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{key}: expected an array of gap names, got {_show(value)}")
            return None
        for i, name in enumerate(value):
            if name.partition(":")[0] not in GAPS:
                known = ", ".join(sorted(GAPS))
                problems.append(f"{key}[{i}]: unknown gap {_show(name)} (known: {known})")
                return None
        return tuple(value)

    return check


def _parse_protection(r: _Reader, problems: list[str]) -> ProtectionConfig:
    ignore: tuple[str, ...] = r.get("ignore", _gap_names(problems), ())
    per_vm = r.table_at("vm")
    vms = []
    for name in per_vm.table:
        own = per_vm.table_at(name)
        vms.append((name, own.get("ignore", _gap_names(problems), ())))
        own.finish()
    r.finish()
    return ProtectionConfig(ignore, tuple(vms))


def _parse_libvirt(readers: list[_Reader], problems: list[str]) -> tuple[LibvirtConfig, ...]:
    out: list[LibvirtConfig] = []
    seen: dict[str, str] = {}
    d = LibvirtConfig()
    for r in readers:
        uri = r.get("uri", r.string(nonempty=True), d.uri)
        if "://" not in uri:
            r.bad("uri", f'expected a libvirt URI such as "qemu:///system", got {_show(uri)}')
        elif uri in seen:
            r.bad("uri", f"{_show(uri)} is already watched by {seen[uri]}")
        seen.setdefault(uri, r.path)

        def globs(key: str, value: Any) -> tuple[str, ...] | None:
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and v for v in value)
            ):
                problems.append(
                    f"{key}: expected a non-empty array of domain name globs, got {_show(value)}"
                )
                return None
            return tuple(value)

        domains: tuple[str, ...] = r.get("domains", globs, d.domains)
        alert_s = r.get("unresponsive_alert_s", r.number(positive=True), d.unresponsive_alert_s)
        r.finish()
        out.append(LibvirtConfig(uri, domains, alert_s))
    return tuple(out)


def _url(r: _Reader) -> str:
    url = r.get("url", r.string(nonempty=True), "")
    if "url" not in r.table:
        r.bad("url", "missing (required)")
    elif url and not url.startswith(("http://", "https://")):
        r.bad("url", f"expected an http:// or https:// URL, got {_show(url)}")
    return url


def _secret_table(r: _Reader, name: str, problems: list[str]) -> dict[str, Secret]:
    """A table of `NAME = "env:VAR" | "file:/path" | "text"` values (headers, environments)."""
    out: dict[str, Secret] = {}
    raw: dict[str, Any] = r.get(name, lambda k, v: v if isinstance(v, dict) else None, {})
    if name in r.table and not isinstance(r.table[name], dict):
        r.bad(name, f"expected a table, got {_show(r.table[name])}")
    for item, value in raw.items():
        key = r.key(f"{name}.{item}")
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {_show(value)}")
        elif (secret := resolve_secret(key, value, problems)) is not None:
            out[item] = secret
    return out


def _parse_alert(r: _Reader, problems: list[str]) -> AlertConfig:
    d = AlertConfig()
    severity = r.get(
        "client_stop_severity", r.string(choices=(*SEVERITIES, "none")), d.client_stop_severity
    )
    host = r.get("host", r.string(), d.host)
    outbox_max = r.get("outbox_max_entries", r.integer(minimum=1), d.outbox_max_entries)
    retry_initial = r.get("retry_initial_s", r.number(), d.retry_initial_s)
    retry_max = r.get("retry_max_s", r.number(), d.retry_max_s)
    if retry_max < retry_initial:
        r.bad("retry_max_s", f"must not be less than retry_initial_s ({retry_initial:g})")
    sink_failing = r.get(
        "degraded_after_sink_failing_s", r.number(), d.degraded_after_sink_failing_s
    )
    external_url = r.get("external_url", r.string(), d.external_url)
    if external_url and not external_url.startswith(("http://", "https://")):
        r.bad("external_url", f"expected an http:// or https:// URL, got {_show(external_url)}")
    runbook_url = r.get("runbook_url", r.string(), d.runbook_url)
    if runbook_url and "{kind}" not in runbook_url:
        r.bad("runbook_url", f'must contain "{{kind}}" (the alert kind), got {_show(runbook_url)}')
    webhooks: list[WebhookConfig] = []
    for w in r.array_of_tables("webhook"):
        url = _url(w)
        headers = _secret_table(w, "headers", problems)
        hmac_ref = w.get("hmac_secret", w.string(nonempty=True), "")
        hmac = resolve_secret(w.key("hmac_secret"), hmac_ref, problems) if hmac_ref else None
        timeout = w.get("timeout_s", w.number(), 5.0)
        w.finish()
        webhooks.append(WebhookConfig(url, headers, hmac, timeout))
    managers: list[AlertmanagerConfig] = []
    for a in r.array_of_tables("alertmanager"):
        url = _url(a)
        timeout = a.get("timeout_s", a.number(), 5.0)
        am_headers = _secret_table(a, "headers", problems)
        resend = a.get("resend_interval_s", a.number(), 60.0)
        a.finish()
        managers.append(AlertmanagerConfig(url, timeout, am_headers, resend))
    execs: list[ExecConfig] = []
    for e in r.array_of_tables("exec"):

        def argv(key: str, value: Any) -> tuple[str, ...] | None:
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                problems.append(
                    f"{key}: expected a non-empty array of strings (argv), got {_show(value)}"
                )
                return None
            return tuple(value)

        command: tuple[str, ...] = e.get("command", argv, ())
        if "command" not in e.table:
            e.bad("command", "missing (required)")
        timeout = e.get("timeout_s", e.number(), 10.0)
        env = _secret_table(e, "env", problems)
        e.finish()
        execs.append(ExecConfig(command, timeout, env))
    r.finish()
    return AlertConfig(
        client_stop_severity=severity,
        host=host,
        outbox_max_entries=outbox_max,
        retry_initial_s=retry_initial,
        retry_max_s=retry_max,
        degraded_after_sink_failing_s=sink_failing,
        external_url=external_url,
        runbook_url=runbook_url,
        webhook=tuple(webhooks),
        alertmanager=tuple(managers),
        exec=tuple(execs),
    )


def parse_config(table: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML; raises ConfigError listing every problem."""
    problems: list[str] = []
    root = _Reader(table, "", problems)
    remediate_table = root.table_at("remediate")
    remediate = _parse_remediate(remediate_table, RemediateConfig())
    remediate_table.finish()
    cfg = Config(
        daemon=_parse_daemon(root.table_at("daemon")),
        connect=_parse_connect(root.table_at("connect")),
        followup=_parse_followup(root.table_at("followup")),
        lifecycle=_parse_lifecycle(root.table_at("lifecycle")),
        remediate=remediate,
        alert=_parse_alert(root.table_at("alert"), problems),
        vms=_parse_vms(root.array_of_tables("vm"), problems, remediate),
        discover=_parse_discover(root.array_of_tables("discover"), problems, remediate),
        listen=_parse_listen(root.array_of_tables("listen"), problems, remediate),
        libvirt=_parse_libvirt(root.array_of_tables("libvirt"), problems),
        protection=_parse_protection(root.table_at("protection"), problems),
    )
    root.finish()
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_config_text(text: str, origin: str = "<config>") -> Config:
    """Parse TOML text; a syntax error is reported with the file name and position."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{origin}: not valid TOML: {err}"]) from None
    return parse_config(table)


def load_config(path: Path) -> Config:
    """Read and parse a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror or err}"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text: {err.reason}"]) from None
    return parse_config_text(text, str(path))
