"""Why a QEMU died: what the host's own reports say, turned into one cause in words.

Pure: the readers (`session/deathwatch.py`) hand in text and fields from the kernel log,
systemd-coredump's journal entries, the result of QEMU's systemd unit, its memory cgroup's
OOM-kill counter and libvirt's stop reason; `decide` picks the most specific cause. Every
piece is matched by the QEMU's PID, which qmpwatch knew while the VM was alive (SO_PEERCRED
at connect), never by a process name.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Kernel log lines (dmesg / journalctl -k), for a given PID.
_OOM = re.compile(
    r"(?P<scope>Memory cgroup out of memory|Out of memory)[^:]*: Killed process (?P<pid>\d+) "
    r"\((?P<comm>[^)]*)\)(?P<rest>.*)"
)
_OOM_CONTEXT = re.compile(r"oom-kill:.*?oom_memcg=(?P<memcg>[^,]*),.*?pid=(?P<pid>\d+)")
_ANON_RSS = re.compile(r"anon-rss:(\d+)kB")
_SEGFAULT = re.compile(r"(?P<comm>\S+)\[(?P<pid>\d+)\]: segfault at (?P<addr>[0-9a-fA-F]+)")
_TRAP = re.compile(r"traps: (?P<comm>\S+)\[(?P<pid>\d+)\] (?P<what>[a-z][a-z ]+?)(?: ip:| sp:|$)")

# The order in which causes explain a death: the first one found wins.
KINDS = ("oom_kill", "segfault", "trap", "core_dump", "signal", "unit_result", "libvirt")


@dataclass(frozen=True, slots=True)
class CrashCause:
    """Why QEMU ended: a stable `kind`, the cause in words, where it was read and details."""

    kind: str  # one of KINDS, or "unknown"
    words: str
    source: str = ""  # kernel_log, coredump, unit, cgroup, libvirt, exit_status
    details: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The cause as alert details / record fields."""
        out: dict[str, Any] = {"crash_cause": self.kind, "crash_cause_words": self.words}
        if self.source:
            out["crash_cause_source"] = self.source
        out.update(self.details)
        return out


UNKNOWN = CrashCause(
    "unknown",
    "the cause is unknown (no OOM kill, segfault, core dump or unit result names this PID)",
)


def signal_words(number: int) -> str:
    """`9` -> "signal 9 (KILL)"."""
    try:
        name = signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return f"signal {number}"
    return f"signal {number} ({name})"


def _gib(kib: int) -> str:
    if kib >= 1024 * 1024:
        return f"{kib / (1024 * 1024):.1f} GiB"
    return f"{kib / 1024:.0f} MiB"


def from_kernel_log(lines: Iterable[str], pid: int, memcg: str = "") -> CrashCause | None:
    """An OOM kill, segfault or trap of `pid` in kernel log lines (the newest wins). `memcg`:
    the memory cgroup QEMU was in, for when the kernel's rate limit dropped its `oom-kill:`
    line (10 dumps per 5 s) and only `Killed process` says it was a cgroup's OOM."""
    found: CrashCause | None = None
    for line in lines:
        context = _OOM_CONTEXT.search(line)
        if context is not None and int(context["pid"]) == pid:
            # Printed before the kill; its "Killed process" line (with anon-rss) follows.
            memcg = context["memcg"]
            found = CrashCause(
                "oom_kill",
                f"killed by the kernel's OOM killer (memory cgroup {memcg})",
                "kernel_log",
                {"pid": pid, "memory_cgroup": memcg},
            )
            continue
        oom = _OOM.search(line)
        if oom is not None and int(oom["pid"]) == pid:
            rss = _ANON_RSS.search(oom["rest"])
            details: dict[str, Any] = {"pid": pid, "comm": oom["comm"]}
            parts = []
            if oom["scope"].startswith("Memory cgroup"):
                parts.append(f"memory cgroup {memcg}" if memcg else "memory cgroup")
                if memcg:
                    details["memory_cgroup"] = memcg
            else:
                parts.append("the host ran out of memory")
            if rss is not None:
                kib = int(rss[1])
                details["anon_rss_bytes"] = kib * 1024
                parts.append(f"anon-rss {_gib(kib)}")
            found = CrashCause(
                "oom_kill",
                f"killed by the kernel's OOM killer ({', '.join(parts)})",
                "kernel_log",
                details,
            )
            continue
        seg = _SEGFAULT.search(line)
        if (
            seg is not None
            and int(seg["pid"]) == pid
            and (found is None or found.kind != "oom_kill")
        ):
            found = CrashCause(
                "segfault",
                f"segfault in {seg['comm']}",
                "kernel_log",
                {"pid": pid, "comm": seg["comm"], "fault_address": seg["addr"]},
            )
            continue
        trap = _TRAP.search(line)
        if trap is not None and int(trap["pid"]) == pid and found is None:
            found = CrashCause(
                "trap",
                f"{trap['what'].strip()} in {trap['comm']}",
                "kernel_log",
                {"pid": pid, "comm": trap["comm"]},
            )
    return found


def from_coredump(entry: Mapping[str, str], pid: int) -> CrashCause | None:
    """A systemd-coredump journal entry (COREDUMP_PID, COREDUMP_SIGNAL[_NAME], ...)."""
    if entry.get("COREDUMP_PID") != str(pid):
        return None
    name = entry.get("COREDUMP_SIGNAL_NAME", "")
    number = entry.get("COREDUMP_SIGNAL", "")
    what = name.removeprefix("SIG") if name else ""
    if number.isdigit():
        what = signal_words(int(number))
    exe = entry.get("COREDUMP_EXE") or entry.get("COREDUMP_COMM") or "QEMU"
    words = f"{what or 'a fatal signal'} in {exe.rsplit('/', 1)[-1]} (core dumped)"
    if name == "SIGSEGV":
        words = f"segfault in {exe.rsplit('/', 1)[-1]} (core dumped)"
    details: dict[str, Any] = {"pid": pid, "core_dumped": True}
    if name:
        details["signal"] = name
    return CrashCause("core_dump", words, "coredump", details)


def from_exit_status(kind: str, status: int) -> CrashCause | None:
    """A known exit: `kind` "killed" or "dumped" with a signal number ("exited": none)."""
    if kind not in ("killed", "dumped"):
        return None
    dumped = " (core dumped)" if kind == "dumped" else ""
    return CrashCause(
        "signal",
        f"killed by {signal_words(status)}{dumped}",
        "exit_status",
        {"signal": status},
    )


# systemd's Result= of a unit whose main process was QEMU.
_UNIT_RESULTS = {
    "oom-kill": ("oom_kill", "killed by the kernel's OOM killer (systemd unit {unit})"),
    "core-dump": ("core_dump", "{signal} (core dumped; systemd unit {unit})"),
    "signal": ("signal", "killed by {signal} (systemd unit {unit})"),
    "exit-code": ("unit_result", "exited with status {status} (systemd unit {unit})"),
    "watchdog": ("unit_result", "killed by systemd's watchdog (systemd unit {unit})"),
    "timeout": ("unit_result", "killed by systemd after a timeout (systemd unit {unit})"),
}


def from_unit(unit: str, props: Mapping[str, str], pid: int) -> CrashCause | None:
    """`systemctl show` properties of QEMU's unit, when its main process was `pid`."""
    if props.get("ExecMainPID") != str(pid):
        return None
    result = props.get("Result", "")
    code = props.get("ExecMainCode", "")  # 1 exited, 2 killed, 3 dumped
    status = props.get("ExecMainStatus", "")
    known = _UNIT_RESULTS.get(result)
    if known is None or not status.lstrip("-").isdigit():
        return None
    kind, template = known
    number = int(status)
    sig = signal_words(number) if code in ("2", "3") else f"status {number}"
    words = template.format(unit=unit, signal=sig, status=number)
    details: dict[str, Any] = {"pid": pid, "unit": unit, "unit_result": result}
    if code in ("2", "3"):
        details["signal"] = number
    return CrashCause(kind, words, "unit", details)


def from_cgroup_oom(memcg: str, before: int, after: int) -> CrashCause | None:
    """The OOM-kill counter of the memory cgroup QEMU was in rose while it died."""
    if after <= before:
        return None
    return CrashCause(
        "oom_kill",
        f"killed by the kernel's OOM killer (memory cgroup {memcg}; its OOM-kill count rose "
        f"from {before} to {after} as QEMU died)",
        "cgroup",
        {"memory_cgroup": memcg},
    )


_LIBVIRT = {
    "failed": "libvirt: QEMU failed (killed or died; libvirt does not say which)",
    "crashed": "libvirt: QEMU crashed",
}


def from_libvirt(reason: str) -> CrashCause | None:
    """libvirt's stop reason of a domain (`failed`, `crashed`)."""
    words = _LIBVIRT.get(reason)
    if words is None:
        return None
    return CrashCause("libvirt", words, "libvirt", {"libvirt_reason": reason})


_LIBVIRT_STOPPED = re.compile(r"^libvirt: the domain stopped \((\w+)\)")


def libvirt_stop_reason(error: str) -> str:
    """The stop reason in a libvirt link's end (`libvirt: the domain stopped (failed): ...`)."""
    found = _LIBVIRT_STOPPED.match(error)
    return found[1] if found is not None else ""


def decide(found: Iterable[CrashCause | None]) -> CrashCause:
    """The cause that explains most: an OOM kill before a segfault before a bare signal, and
    a segfault with a core dump says both."""
    causes = [c for c in found if c is not None]
    if not causes:
        return UNKNOWN
    causes.sort(key=lambda c: KINDS.index(c.kind) if c.kind in KINDS else len(KINDS))
    best = causes[0]
    dumped = any(c.kind == "core_dump" or "core dumped" in c.words for c in causes[1:])
    if best.kind in ("segfault", "trap") and dumped and "core dumped" not in best.words:
        best = CrashCause(
            best.kind,
            f"{best.words} (core dumped)",
            best.source,
            {**best.details, "core_dumped": True},
        )
    return best


def settled(cause: CrashCause) -> bool:
    """Whether nothing later can explain more (stop waiting for other reports): an OOM kill
    with its "Killed process" line, a core dump, or what systemd or the exit status said."""
    if cause.kind == "oom_kill":
        return cause.source != "kernel_log" or "anon_rss_bytes" in cause.details
    return (
        cause.kind == "core_dump"
        or cause.source in ("unit", "exit_status")
        or (cause.kind == "segfault" and "core dumped" in cause.words)
    )
