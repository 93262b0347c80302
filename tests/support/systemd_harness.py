"""A real systemd 252 for the tests: PID 1 of a throwaway PID + mount namespace, on an overlay of /.

`SystemdNamespace.boot()` follows the recipe of the project's systemd facts
(tests/support/systemd_ns.sh does the mounts): a private cgroup subtree on the host, `unshare`
of new PID, mount, UTS, IPC and network namespaces, an overlay of / whose writes go to a tmpfs,
its own /proc, /dev, /run, /tmp and /sys/fs/cgroup view, and systemd on a minimal target of its
own (sysinit and sockets: journald, tmpfiles, sysusers; none of the host's services). Commands
run inside through `nsenter` (`run`), files are reached through /proc/PID/root (`path`).
`close()` kills PID 1 (the kernel then kills every process of the namespace, and its mounts go
with it), waits until none of its processes is left, removes the cgroup subtrees depth-first and
fails if anything stays.

Never boot systemd on the machine's own root: its tmpfiles would empty the host's /tmp and its
default target would start the host's services. tests/support/systemd_ns.sh refuses to exec systemd
unless / is the overlay.

What it needs (`requirements()` names whatever is missing, and the tests fail with that, never
skip): root, util-linux's unshare, nsenter, setpriv and mountpoint, /lib/systemd/systemd,
and cgroups as v1 `name=systemd` + `unified` (hybrid) or v2.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
SCRIPT = Path(__file__).resolve().with_name("systemd_ns.sh")
SYSTEMD = Path("/lib/systemd/systemd")
PREFIX = "qmpwatch-test-"
BOOT_TIMEOUT_S = 120.0  # two shared cores: a boot takes about 1 s when idle
TEARDOWN_TIMEOUT_S = 60.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLL_S = 0.02  # how often a condition with a deadline is looked at

_names = itertools.count()


class SystemdUnavailable(Exception):
    """A real systemd cannot be booted here; the message says what is missing."""


class Leftovers(Exception):
    """Teardown left something behind on the host (named in the message)."""


def wait_until(
    what: str, check: Callable[[], Any], timeout: float, interval: float = POLL_S
) -> Any:
    """`check()` every `interval` until it returns something true, at most `timeout` seconds;
    AssertionError naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of this process's mount namespace, in order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        found.append((fields[4].replace("\\040", " "), fstype))
    return found


def cgroup_hierarchies() -> list[Path]:
    """The hierarchies systemd places itself by: v1 name=systemd and unified, or the v2 root."""
    types = dict(mounts())
    if types.get(str(CGROUP_ROOT)) == "cgroup2":
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified"]


def all_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy, where systemd may have made cgroups."""
    return [Path(m) for m, t in mounts() if t in ("cgroup", "cgroup2")]


def requirements() -> list[str]:
    """What is missing to boot a real systemd here, one phrase each (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the harness mounts file systems and makes namespaces and cgroups)")
    for program in ("unshare", "nsenter", "setpriv", "mountpoint"):
        if shutil.which(program) is None:
            missing.append(f"{program} (Debian package util-linux)")
    if not SYSTEMD.exists():
        missing.append(f"{SYSTEMD} (Debian package systemd)")
    for hierarchy in cgroup_hierarchies():
        if not (hierarchy / "cgroup.procs").exists():
            missing.append(f"the cgroup hierarchy {hierarchy}")
        elif not os.access(hierarchy, os.W_OK):
            missing.append(f"write access to {hierarchy}")
    return missing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes_in(tree: Path) -> list[int]:
    """The processes in a cgroup subtree."""
    pids: list[int] = []
    for directory, _, files in os.walk(tree):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                text = (Path(directory) / "cgroup.procs").read_text()
                pids += [int(p) for p in text.split()]
    return pids


def _empty(tree: Path) -> bool:
    return not processes_in(tree)


def remove_tree(tree: Path) -> None:
    """rmdir a cgroup subtree, deepest first (cgroup directories hold only virtual files)."""
    for directory, _, _ in sorted(os.walk(tree), key=lambda w: -len(Path(w[0]).parts)):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)


def remove_stale() -> None:
    """Remove the cgroup subtrees of earlier runs whose process is gone (a killed test run)."""
    for hierarchy in all_hierarchies():
        with contextlib.suppress(OSError):
            for tree in hierarchy.glob(f"{PREFIX}*"):
                owner = tree.name[len(PREFIX) :].split("-")[0]
                if owner.isdigit() and not _alive(int(owner)) and not processes_in(tree):
                    with contextlib.suppress(OSError):
                        remove_tree(tree)


class SystemdNamespace:
    """One booted systemd: `boot()`, then `run()` and `path()`, then `close()` (always)."""

    def __init__(self, work: Path, binds: Mapping[Path, str] | None = None) -> None:
        """`work`: an empty host directory for the namespace's tmpfs; `binds`: host directory
        -> where it appears inside (under /mnt, read-only)."""
        self.work = work
        self.binds = dict(binds or {})
        self.name = f"{PREFIX}{os.getpid()}-{next(_names)}"
        self.pid = 0  # PID 1 of the namespace, as the host sees it
        self._pidns = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._trees: list[Path] = []
        self.boot_s = 0.0

    # -- lifecycle ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start systemd and wait until it is `running`; SystemdUnavailable says why not."""
        missing = requirements()
        if missing:
            raise SystemdUnavailable("missing: " + "; ".join(missing))
        remove_stale()
        started = time.monotonic()
        for hierarchy in cgroup_hierarchies():
            tree = hierarchy / self.name
            try:
                tree.mkdir()
            except OSError as err:
                raise SystemdUnavailable(f"cannot make the cgroup {tree}: {err}") from err
            self._trees.append(tree)
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "boot.log", "wb") as log:  # the namespace keeps its own copy
            self._proc = subprocess.Popen(
                [
                    str(SCRIPT),
                    "outer",
                    ":".join(str(t) for t in self._trees),
                    str(self.work / "ns"),
                    *(f"{src}:{dest}" for src, dest in self.binds.items()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = wait_until("systemd to start as PID 1 of the namespace", self._pid1, 60.0)
        self._pidns = os.readlink(f"/proc/{self.pid}/ns/pid")
        wait_until(
            "systemd's private socket",
            lambda: self._ended() or self.path("/run/systemd/private").exists(),
            BOOT_TIMEOUT_S,
        )
        self._ended()
        state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise SystemdUnavailable(f"systemd did not come up: {state!r}; failed units: {failed}")
        self.boot_s = time.monotonic() - started

    def _pid1(self) -> int | None:
        self._ended()
        assert self._proc is not None
        u = self._proc.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{u}/task/{u}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                return int(children[0])
        return None

    def _ended(self) -> bool:
        """False while the namespace runs; SystemdUnavailable with its log once it ended."""
        if self._proc is None or self._proc.poll() is None:
            return False
        text = (self.work / "boot.log").read_text(errors="replace").strip()
        raise SystemdUnavailable(
            f"the namespace ended (status {self._proc.returncode}) before systemd was up: "
            f"{text or 'no output'}"
        )

    def close(self) -> None:
        """Kill the namespace, remove its cgroups and work directory; Leftovers if anything
        stays (a process, a cgroup, a mount)."""
        problems: list[str] = []
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid or proc.pid, signal.SIGKILL)
            try:
                proc.wait(TEARDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                problems.append("unshare did not end when PID 1 was killed")
        if self._pidns:
            try:
                wait_until(
                    "the namespace's processes to end",
                    lambda: not self._processes_inside(),
                    TEARDOWN_TIMEOUT_S,
                )
            except AssertionError:
                problems.append(f"processes left in the namespace: {self._processes_inside()}")
        for hierarchy in all_hierarchies():
            tree = hierarchy / self.name
            if not tree.exists():
                continue
            try:
                wait_until(f"{tree} to empty", functools.partial(_empty, tree), TEARDOWN_TIMEOUT_S)
                remove_tree(tree)
            except (AssertionError, OSError) as err:
                problems.append(f"cgroup {tree} left: {err}")
        work = str(self.work)
        mounted = [m for m, _ in mounts() if m == work or m.startswith(work + "/")]
        if mounted:
            problems.append(f"mounts left on the host: {mounted}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        self._proc = None
        if problems:
            raise Leftovers("; ".join(problems))

    def _processes_inside(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "pid") == self._pidns:
                        found.append(int(entry.name))
        return found

    # -- inside ---------------------------------------------------------------------------------

    def command(self, *argv: str) -> list[str]:
        """`argv` as run inside the namespace, as root, with a clean environment."""
        return [
            "nsenter",
            "-t",
            str(self.pid),
            "-a",
            "--",
            "env",
            "-i",
            f"PATH={PATH}",
            "LANG=C.UTF-8",
            "SYSTEMD_COLORS=0",
            "SYSTEMD_PAGER=",
            *argv,
        ]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside and wait for it; with `check`, AssertionError unless it exits 0."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]  # env -i PATH=... K=V argv
        result = subprocess.run(
            self.command(*extra, *argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)}: exit status {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def path(self, inside: str) -> Path:
        """A path inside the namespace, as the host reaches it."""
        return Path(f"/proc/{self.pid}/root{inside}")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show UNIT -p ...` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# -- the journal, followed live --------------------------------------------------------------------


def text_of(value: Any) -> str:
    """A journal field as `journalctl -o json` gives it: a string, or bytes as a list."""
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def record_of(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The qmpwatch record in a journal entry: its QMPWATCH_JSON field (log_target = "journal"),
    or its MESSAGE when qmpwatch wrote the JSON line to stdout; None for other entries."""
    if "QMPWATCH_JSON" in entry:
        record: dict[str, Any] = json.loads(text_of(entry["QMPWATCH_JSON"]))
        return record
    if entry.get("SYSLOG_IDENTIFIER") == "qmpwatch":
        message = text_of(entry.get("MESSAGE", ""))
        if message.startswith("{"):
            with contextlib.suppress(ValueError):
                parsed: dict[str, Any] = json.loads(message)
                return parsed
    return None


def matches(record: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in match.items())


class Journal:
    """The namespace's journal, followed with `journalctl -f -o json` from a reader thread."""

    def __init__(self, ns: SystemdNamespace) -> None:
        self.entries: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._proc = subprocess.Popen(
            ns.command("journalctl", "--follow", "--output=json", "--lines=all", "--no-pager"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, name="journal", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from tests.support import contract  # the suite's plugin (imported here: conftest first)

        stream: IO[bytes] | None = self._proc.stdout
        assert stream is not None
        for line in stream:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                record = record_of(entry)
                if record is not None:
                    contract.observe(record)  # the suite's contract check counts it
                with self._changed:
                    self.entries.append(entry)
                    self._changed.notify_all()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(30)
        self._thread.join(30)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def mark(self) -> int:
        """Where the journal is now: pass it as `after` to wait for what comes next."""
        with self._changed:
            return len(self.entries)

    def records(self, after: int = 0) -> list[dict[str, Any]]:
        with self._changed:
            entries = self.entries[after:]
        return [r for r in map(record_of, entries) if r is not None]

    def find(self, event: str, after: int = 0, **match: Any) -> dict[str, Any] | None:
        for record in self.records(after):
            if record.get("event") == event and matches(record, match):
                return record
        return None

    def wait_entry(
        self, what: str, check: Callable[[dict[str, Any]], bool], after: int, timeout: float
    ) -> dict[str, Any]:
        """The first entry from `after` on for which `check` is true; AssertionError naming
        `what` (and the records seen) when none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        seen = after
        with self._changed:
            while True:
                for entry in self.entries[seen:]:
                    if check(entry):
                        return entry
                seen = len(self.entries)
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [text_of(e.get("MESSAGE", "")) for e in self.entries[after:]][-30:]
                    raise AssertionError(
                        f"no {what} within {timeout:g} s; the journal since: " + "\n".join(tail)
                    )
                self._changed.wait(left)

    def wait(self, event: str, after: int, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        """The first qmpwatch record `event` (with `match`) from `after` on."""

        def check(entry: dict[str, Any]) -> bool:
            record = record_of(entry)
            return record is not None and record.get("event") == event and matches(record, match)

        entry = self.wait_entry(f"{event} {dict(match)}", check, after, timeout)
        record = record_of(entry)
        assert record is not None
        return record


# -- a QEMU monitor, from the host ---------------------------------------------------------------


def qmp(path: Path, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
    """Run one QMP command on the monitor at `path` (a connection of its own); its return."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        greeting = json.loads(stream.readline())
        assert "QMP" in greeting, greeting
        result: Any = None
        for request in (
            {"execute": "qmp_capabilities"},
            {"execute": command, "arguments": arguments},
        ):
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "error" in reply:
                    raise AssertionError(f"{command}: {reply['error']}")
                if "return" in reply:
                    result = reply["return"]
                    break
        return result


# -- the package as wheels, built on the host (the namespace has no network) ---------------------


class WheelBuild:
    """`pip wheel` of this checkout and its dependencies into a directory, in the background.

    Started when the session begins (conftest), so that its wait for the package index overlaps
    the tests before the ones that need it; `wait()` returns the directory.
    """

    def __init__(self, root: Path, target: Path) -> None:
        self.root = root
        self.target = target
        self.log = target.with_suffix(".log")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        source = copy_sources(self.root, self.target.with_name("src"))
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--wheel-dir",
                    str(self.target),
                    str(source),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float = 600.0) -> Path:
        if self._proc is None:
            self.start()
        assert self._proc is not None
        status = self._proc.wait(timeout)
        if status != 0:
            raise AssertionError(
                f"pip wheel of {self.root} failed ({status}): {self.log.read_text()[-4000:]}"
            )
        return self.target

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(30)


def copy_sources(root: Path, dest: Path) -> Path:
    """The files of the checkout `root` that git knows or would add, copied to `dest` (pip
    builds in the source tree: the checkout gets no build/ of its own); `root` itself when it
    is not a git checkout."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        return root
    for name in listed.stdout.decode().split("\0"):
        if not name or not os.path.lexists(root / name):
            continue  # deleted in the work tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)
    return dest


_WHEELS: dict[Path, WheelBuild] = {}  # the session's builds, by checkout


def wheels_for(root: Path) -> WheelBuild:
    """The session's wheel build of `root` (started by `start_wheels`, or now)."""
    start_wheels(root)
    return _WHEELS[root]


def start_wheels(root: Path) -> None:
    """Start building the wheels of `root` in the background, into a temporary directory."""
    if root not in _WHEELS:
        build = WheelBuild(root, Path(tempfile.mkdtemp(prefix="qmpwatch-wheels-")) / "wheels")
        build.start()
        _WHEELS[root] = build


def stop_wheels() -> None:
    """Stop the builds still running and remove their directories (the end of the session)."""
    while _WHEELS:
        _, build = _WHEELS.popitem()
        build.cancel()
        shutil.rmtree(build.target.parent, ignore_errors=True)


@contextlib.contextmanager
def booted(work: Path, binds: Mapping[Path, str]) -> Iterator[SystemdNamespace]:
    """A booted namespace, closed on every path out."""
    ns = SystemdNamespace(work, binds)
    try:
        ns.boot()
        yield ns
    finally:
        ns.close()


def unit_text(sections: Mapping[str, Sequence[str]]) -> str:
    """A unit file from {section: ["Key=value", ...]}."""
    return "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in sections.items()
    )
