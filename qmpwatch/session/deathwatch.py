"""Why a QEMU died: read what the host reports about a PID, off the event loop, within a deadline.

While QEMU lives (`Witness.of`, at connect): its PID, the memory cgroup it runs in and that
cgroup's OOM-kill count, and the systemd unit whose process it is (from /proc/PID/cgroup).
When it dies without a clean end (`find_cause`), until `wait_s` has passed or a cause is
settled, every 0.2 s: the kernel log (/dev/kmsg where readable, else `journalctl --dmesg`,
which needs the journal's group: `systemd-journal`), systemd-coredump's journal entries for
the PID, the unit's `systemctl show` (Result=, ExecMainStatus=) and the cgroup's OOM-kill
count. File reads run in a thread; journalctl and systemctl are child processes with a
deadline. `core.crashcause` turns what was read into one cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qmpwatch.core import crashcause
from qmpwatch.core.crashcause import CrashCause

CGROUP_ROOT = Path("/sys/fs/cgroup")
POLL_S = 0.2
RECENT_S = 30.0  # reports older than this at the death are about something else
TOOL_TIMEOUT_S = 1.0  # one journalctl or systemctl run
KMSG = "/dev/kmsg"
KMSG_MAX_RECORDS = 20_000  # the ring buffer holds far fewer; a bound all the same
SINCE_MARGIN_S = 2.0  # kernel log lines this long before the connect still count
UNIT_PROPERTIES = "MainPID,ExecMainPID,ExecMainCode,ExecMainStatus,Result"


@dataclass(frozen=True, slots=True)
class Witness:
    """What qmpwatch knew about a live QEMU, to ask about it once it is gone."""

    pid: int
    since_mono: float  # CLOCK_MONOTONIC at connect (the kernel log's clock)
    since_real: float  # epoch seconds at connect (the journal's)
    memcg: str = ""  # the memory cgroup's path ("" for the root or unknown)
    oom_file: str = ""  # memory.events (v2) or memory.oom_control (v1)
    oom_kills: int = 0  # its oom_kill count at connect
    unit: str = ""  # the systemd unit whose process QEMU is ("" when none)

    @classmethod
    def of(cls, pid: int, cgroup_text: str | None = None) -> Witness:
        """Read /proc/PID/cgroup now (procfs: no dependency that can hang)."""
        if cgroup_text is None:
            try:
                cgroup_text = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8")
            except OSError:
                cgroup_text = ""
        memcg, oom_file, unit = _cgroup_facts(cgroup_text)
        kills = _oom_kills(oom_file) if oom_file else None
        return cls(
            pid,
            time.monotonic(),
            time.time(),
            memcg if kills is not None else "",
            oom_file if kills is not None else "",
            kills or 0,
            unit,
        )


def _cgroup_facts(text: str) -> tuple[str, str, str]:
    """(memory cgroup path, its OOM-kill counter file, systemd unit) from /proc/PID/cgroup."""
    memcg = oom_file = unit = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(",") and path != "/":
            oom = CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control"
            memcg, oom_file = path, str(oom)
        elif controllers == "" and path != "/":
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if last.endswith(".service"):
                unit = last
            if not memcg:
                for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                    events = base / path.lstrip("/") / "memory.events"
                    if events.exists():
                        memcg, oom_file = path, str(events)
                        break
        elif controllers == "name=systemd" and not unit:
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if last.endswith(".service"):
                unit = last
    return memcg, oom_file, unit


def _oom_kills(path: str) -> int | None:
    """The `oom_kill` count of memory.events / memory.oom_control; None when unreadable."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def read_kmsg(since_mono: float) -> list[str] | None:
    """Kernel log messages since `since_mono` (None: /dev/kmsg is not readable here)."""
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    since_us = int((since_mono - SINCE_MARGIN_S) * 1_000_000)
    lines: list[str] = []
    try:
        for _ in range(KMSG_MAX_RECORDS):
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == 32:  # EPIPE: overwritten while reading; read on
                    continue
                if not lines:
                    return None  # EPERM under dmesg_restrict, ...
                break
            if not raw:
                break
            head, _, message = raw.decode("utf-8", "replace").partition(";")
            fields = head.split(",")
            if len(fields) >= 3 and fields[2].isdigit() and int(fields[2]) >= since_us:
                lines.append(message.split("\n", 1)[0])
    finally:
        os.close(fd)
    return lines


async def _tool(*argv: str) -> str | None:
    """A read-only tool's output within TOOL_TIMEOUT_S; None when it cannot run or fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(TOOL_TIMEOUT_S):
            out, _ = await proc.communicate()
    except BaseException as err:  # the deadline, or the caller's: never leave it running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        if isinstance(err, TimeoutError):
            return None
        raise
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


JOURNAL_DIRS = ("/run/log/journal", "/var/log/journal")


def journal_present() -> bool:
    """Whether a journal with files is readable here (journalctl says nothing otherwise)."""
    for top in JOURNAL_DIRS:
        with contextlib.suppress(OSError), os.scandir(top) as entries:
            for sub in entries:
                if sub.is_dir() and os.access(sub.path, os.R_OK | os.X_OK):
                    return True
    return False


def exit_state(pid: int) -> tuple[str, int | None]:
    """("alive" | "zombie" | "gone", the wait status of a zombie) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "gone", None
    fields = text.rpartition(")")[2].split()
    if not fields or fields[0] != "Z":
        return ("alive" if fields and fields[0] != "X" else "gone"), None
    code = fields[49] if len(fields) > 49 else ""
    return "zombie", int(code) if code.isdigit() else None


class _Readers:
    """The host's reports about one dead QEMU, each read as often as it may change."""

    def __init__(self, w: Witness) -> None:
        self.w = w
        # From the connect, but no further back than RECENT_S: what killed QEMU is logged in
        # the moment before its end, and a journal scan of months could miss its deadline.
        self.since_mono = max(w.since_mono, time.monotonic() - RECENT_S)
        self.since_real = max(w.since_real, time.time() - RECENT_S)
        self.kmsg_readable = True
        self.journal_usable = False  # find_cause looks (off the loop: /var is a disk)
        self.unit_cause: CrashCause | None = None
        self.exited = False  # the process has finished exiting (gone, or a zombie)

    async def kernel(self) -> CrashCause | None:
        w = self.w
        if self.kmsg_readable:
            lines = await asyncio.to_thread(read_kmsg, self.since_mono)
            if lines is not None:
                return crashcause.from_kernel_log(lines, w.pid, w.memcg)
            self.kmsg_readable = False
        if not self.journal_usable:
            return None
        out = await _tool(
            "journalctl", "--dmesg", "-q", "--no-pager", "-o", "cat",
            f"--since=@{int(self.since_real - SINCE_MARGIN_S)}",
        )  # fmt: skip
        if out is None:
            self.journal_usable = False
            return None
        return crashcause.from_kernel_log(out.splitlines(), w.pid, w.memcg)

    async def coredump(self) -> CrashCause | None:
        if not self.journal_usable:
            return None
        out = await _tool(
            "journalctl", "-q", "--no-pager", "-o", "export", f"COREDUMP_PID={self.w.pid}",
            f"--since=@{int(self.since_real - SINCE_MARGIN_S)}",
        )  # fmt: skip
        if not out:
            return None
        entry = dict(
            line.split("=", 1) for line in out.splitlines() if "=" in line and line[:1].isupper()
        )
        return crashcause.from_coredump(entry, self.w.pid)

    async def unit(self) -> CrashCause | None:
        w = self.w
        if not w.unit or self.unit_cause is not None:
            return self.unit_cause
        out = await _tool(
            "systemctl", "show", f"--property={UNIT_PROPERTIES}", "--", w.unit,
        )  # fmt: skip
        if out is None:
            return None
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if props.get("MainPID") == str(w.pid):
            return None  # systemd has not reaped it yet
        self.unit_cause = crashcause.from_unit(w.unit, props, w.pid)
        return self.unit_cause

    def exit_status(self) -> CrashCause | None:
        """A zombie's wait status (a parent that has not reaped it yet, e.g. qmpwatch's own
        child); also notes whether the process has finished exiting."""
        state, status = exit_state(self.w.pid)
        self.exited = state != "alive"
        if status is None or not status & 0x7F:
            return None
        return crashcause.from_exit_status("dumped" if status & 0x80 else "killed", status & 0x7F)

    def nothing_more(self) -> bool:
        """Whether no report can still come: the kernel log is read as the kernel writes it,
        no journal can bring a core dump, systemd has spoken, and the process is gone."""
        unit_done = not self.w.unit or self.unit_cause is not None
        return self.kmsg_readable and not self.journal_usable and unit_done and self.exited

    async def cgroup(self) -> CrashCause | None:
        w = self.w
        if not w.oom_file:
            return None
        kills = await asyncio.to_thread(_oom_kills, w.oom_file)
        if kills is None:
            return None
        return crashcause.from_cgroup_oom(w.memcg, w.oom_kills, kills)


async def find_cause(
    witness: Witness | None, wait_s: float, libvirt_reason: str = ""
) -> CrashCause:
    """Why the QEMU of `witness` died, waiting at most `wait_s` for the host's reports."""
    base = crashcause.from_libvirt(libvirt_reason) if libvirt_reason else None
    if witness is None:
        return crashcause.decide([base])
    readers = _Readers(witness)
    deadline = time.monotonic() + wait_s
    cause = crashcause.decide([base])
    try:
        async with asyncio.timeout(wait_s):
            readers.journal_usable = await asyncio.to_thread(journal_present)
    except TimeoutError:
        return cause
    while True:
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                found = await asyncio.gather(
                    readers.kernel(), readers.coredump(), readers.unit(), readers.cgroup()
                )
        except TimeoutError:
            return cause
        cause = crashcause.decide([base, readers.exit_status(), *found])
        if crashcause.settled(cause) or readers.nothing_more():
            return cause
        if time.monotonic() + POLL_S >= deadline:
            return cause
        await asyncio.sleep(POLL_S)
