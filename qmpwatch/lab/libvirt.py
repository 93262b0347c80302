"""A real libvirt for tests and benchmarks: libvirtd and virtlogd brought up without systemd,
and throwaway transient domains running the halt firmware (`qmpwatch.lab.halt_firmware`).

The recipe (shared/libvirt-facts.md): as root, the user `libvirt-qemu` must exist, a qemu.conf
that lets QEMU run in a sandbox (no cgroups, namespaces or security driver; QEMU as root,
which libvirt marks with the taint `high-privileges`: /dev/kvm is root's here),
`/var/log/libvirt/qemu`, `virtlogd -d` and then `libvirtd -d`, polled until it answers.
`LibvirtLab.up()` stops daemons left by an earlier run first (those it recognises: the
qemu.conf is the lab's, and the run named in `OWNER_FILE` has ended), never another live
run's; `down()` destroys the lab's domains, stops both daemons and leaves the host as it
found it (no qemu.conf and no `libvirt-qemu` user unless they were there before).

Domains are named `LAB_PREFIX...`; test actions go through `virsh` (`qemu-monitor-command`
taints a domain `custom-monitor`: tests only, never qmpwatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from qmpwatch.lab import BlkdebugSpec, LabError, halt_firmware

URI = "qemu:///system"
LAB_PREFIX = "qwlab-"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_MARK = "# written by qmpwatch's libvirt lab"  # (it was once in qmpwatch/lab_libvirt.py)
QEMU_CONF_TEXT = f"""{QEMU_CONF_MARK} (qmpwatch/lab/libvirt.py)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""
LIBVIRTD_PID = Path("/run/libvirtd.pid")
#: The process whose lab runs libvirtd now: "PID START" (START: its start time in clock
#: ticks after boot, so that a reused PID is not taken for it).
OWNER_FILE = Path("/run/qmpwatch-libvirt-lab.owner")
QEMU_USER = "libvirt-qemu"
VIRTLOGD_PID = Path("/run/virtlogd.pid")
START_TIMEOUT_S = 180.0  # the first start probes QEMU's capabilities (about 8 s when idle)
STOP_TIMEOUT_S = 15.0
EMULATOR = "/usr/bin/qemu-system-x86_64"
_ATA_PORT = 0x1F0


class LibvirtLabError(LabError):
    """The lab's libvirt could not be brought up or driven."""


def _alive(pid_file: Path, program: str) -> int | None:
    """The PID in `pid_file` if that process runs `program`."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == program else None


def _start_time(pid: int) -> str | None:
    """When process `pid` started (field 22 of /proc/PID/stat), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}"


def live_owner(owner_file: Path = OWNER_FILE) -> str | None:
    """The run ("PID START") whose lab runs libvirtd, if that process still runs."""
    try:
        pid, start = owner_file.read_text().split()
    except (OSError, ValueError):
        return None
    return f"{pid} {start}" if _start_time(int(pid)) == start else None


def conf_to_restore(conf: Path) -> bytes | None:
    """What `conf` must hold again when the lab goes down: its bytes now, or None (remove
    it) when it is missing or the lab's own, left by a run that did not finish."""
    try:
        text = conf.read_bytes()
    except FileNotFoundError:
        return None
    return None if QEMU_CONF_MARK.encode() in text else text


def restore_conf(conf: Path, before: bytes | None) -> None:
    """Put `conf` back as `conf_to_restore` found it."""
    if before is None:
        with contextlib.suppress(FileNotFoundError):
            conf.unlink()
    else:
        conf.write_bytes(before)


def _stop(pid_file: Path, program: str) -> None:
    pid = _alive(pid_file, program)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.02)


def virsh_sync(*args: str, check: bool = True) -> str:
    """Run `virsh -c URI ARGS...` and return its output."""
    done = subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise LibvirtLabError(f"virsh {shlex.join(args)}: {done.stderr.strip()}")
    return done.stdout


async def virsh(*args: str, check: bool = True) -> str:
    """`virsh_sync`, without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        "virsh", "-q", "-c", URI, *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise LibvirtLabError(f"virsh {shlex.join(args)}: {err.decode().strip()}")
    return out.decode()


class LibvirtLab:
    """libvirtd and virtlogd run by this process, and a directory for domain files."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.firmware = halt_firmware(workdir / "halt.bin")
        os.chmod(workdir, 0o755)
        self._owner = False  # this lab started the daemons (and wrote OWNER_FILE)
        self._prepared = False  # this lab wrote qemu.conf (and perhaps added the user)
        self._conf_before: bytes | None = None
        self._made_user = self._made_group = False

    @classmethod
    @contextlib.contextmanager
    def running(cls, workdir: Path) -> Iterator[LibvirtLab]:
        """Bring libvirt up for the block's duration; always take it down after."""
        lab = cls(workdir)
        try:
            lab.up()
            yield lab
        finally:
            lab.down()

    def up(self) -> None:
        if os.geteuid() != 0:
            raise LibvirtLabError("the libvirt lab runs libvirtd, which needs root")
        owner = live_owner()
        if owner is not None and owner != _me():
            raise LibvirtLabError(
                f"libvirtd belongs to another test run (process {owner.split()[0]}, "
                f"{OWNER_FILE}): run the libvirt tests one at a time, under "
                "flock /tmp/qmpwatch-libvirt.lock"
            )
        self._prepare()
        if _alive(LIBVIRTD_PID, "libvirtd") is not None or _alive(VIRTLOGD_PID, "virtlogd"):
            self._take_over()  # left by a run that ended without taking them down
        OWNER_FILE.write_text(_me())
        self._owner = True
        self._start_virtlogd()
        self.start_libvirtd()
        self._destroy_all()  # left by an earlier run
        # libvirt probes QEMU's capabilities on first use (seconds; more on a loaded machine):
        # now, so that no test's deadline pays for it.
        virsh_sync("domcapabilities", "--emulatorbin", EMULATOR, "--virttype", "qemu")

    def _prepare(self) -> None:
        try:
            pwd.getpwnam(QEMU_USER)  # libvirtd looks it up before reading qemu.conf
        except KeyError:
            try:
                grp.getgrnam(QEMU_USER)
            except KeyError:
                subprocess.run(["groupadd", "-r", QEMU_USER], check=True)
                self._made_group = True
            subprocess.run(
                ["useradd", "-r", "-g", QEMU_USER, "-d", "/var/lib/libvirt",
                 "-s", "/usr/sbin/nologin", QEMU_USER],
                check=True,
            )  # fmt: skip
            self._made_user = True
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        if QEMU_CONF.exists() and QEMU_CONF_MARK not in QEMU_CONF.read_text():
            raise LibvirtLabError(
                f"{QEMU_CONF} is not the lab's: this machine has its own libvirt, which the "
                "tests would stop and restart; run them on a machine without one"
            )
        self._conf_before = conf_to_restore(QEMU_CONF)
        self._prepared = True
        QEMU_CONF.write_text(QEMU_CONF_TEXT)

    def _take_over(self) -> None:
        """Daemons left running by an earlier run (the qemu.conf is the lab's): stop them."""
        _stop(LIBVIRTD_PID, "libvirtd")
        _stop(VIRTLOGD_PID, "virtlogd")

    def _start_virtlogd(self) -> None:
        subprocess.run(["virtlogd", "-d"], check=True)

    def start_libvirtd(self) -> None:
        """Start libvirtd and wait until it answers."""
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            done = subprocess.run(
                ["virsh", "-c", URI, "version"], capture_output=True, text=True, check=False
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtLabError(f"libvirtd did not answer in time: {done.stderr.strip()}")
            time.sleep(0.05)

    def stop_libvirtd(self) -> None:
        """Stop libvirtd (its domains keep running)."""
        _stop(LIBVIRTD_PID, "libvirtd")

    def down(self) -> None:
        """Take down what `up` brought up (only that: never another run's daemons), and put
        the host back as it was: qemu.conf, and the user and group if the lab added them."""
        if self._owner:
            if _alive(LIBVIRTD_PID, "libvirtd") is not None:
                self._destroy_all()
            _stop(LIBVIRTD_PID, "libvirtd")
            _stop(VIRTLOGD_PID, "virtlogd")
            with contextlib.suppress(FileNotFoundError):
                OWNER_FILE.unlink()
            self._owner = False
        if not self._prepared:
            return
        self._prepared = False
        restore_conf(QEMU_CONF, self._conf_before)
        if self._made_user:
            subprocess.run(["userdel", QEMU_USER], check=False)
        if self._made_group:
            subprocess.run(["groupdel", QEMU_USER], check=False)

    def _destroy_all(self) -> None:
        """Destroy the lab's running domains, all at once (each takes a second or two)."""
        procs = [
            subprocess.Popen(
                ["virsh", "-q", "-c", URI, "destroy", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name in self.domains()
        ]
        for proc in procs:
            proc.wait()

    def domains(self) -> list[str]:
        """The lab's running domains."""
        names = virsh_sync("list", "--name", check=False).split()
        return [n for n in names if n.startswith(LAB_PREFIX)]


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """A throwaway domain: 64 MiB, the halt firmware, and the devices a test needs."""

    name: str
    watchdog_action: str | None = None  # <watchdog model='ib700' action=.../>
    panic: bool = False  # <panic model='isa'/> (pvpanic)
    blkdebug: BlkdebugSpec | None = None  # an IDE disk behind blkdebug (adds -drive/-device)
    extra_args: tuple[str, ...] = ()  # more of QEMU's options, as <qemu:commandline> adds them
    extra_devices: tuple[str, ...] = ()  # more <devices> elements, as XML

    def xml(self, lab: LibvirtLab) -> str:
        devices = [
            f"<emulator>{EMULATOR}</emulator>",
            "<controller type='usb' model='none'/>",
            "<memballoon model='none'/>",
        ]
        if self.watchdog_action is not None:
            devices.append(f"<watchdog model='ib700' action='{self.watchdog_action}'/>")
        if self.panic:
            devices.append("<panic model='isa'/>")
        devices += self.extra_devices
        args = list(self.extra_args)
        if self.blkdebug is not None:
            # libvirt's XML has no blkdebug source: the drive goes on QEMU's command line
            # (which taints the domain custom-argv, as the port writes that drive it do).
            conf = lab.workdir / f"{self.name}.blkdebug"
            conf.write_text(self.blkdebug.config_text())
            image = lab.workdir / f"{self.name}.img"
            image.write_bytes(bytes(self.blkdebug.image_size))
            drive = (
                f"file=blkdebug:{conf}:{image},if=none,format=raw,id=drive0,"
                f"rerror={self.blkdebug.rerror},werror={self.blkdebug.werror}"
            )
            args += ["-drive", drive, "-device", "ide-hd,drive=drive0,bus=ide.0"]
        extra = ""
        if args:
            extra = (
                "<qemu:commandline>"
                + "".join(f"<qemu:arg value='{escape(a)}'/>" for a in args)
                + "</qemu:commandline>"
            )
        return (
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
            f"<name>{escape(self.name)}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type>"
            f"<loader type='rom'>{lab.firmware}</loader></os>"
            "<on_crash>preserve</on_crash>"
            f"<devices>{''.join(devices)}</devices>{extra}</domain>"
        )


class LabDomain:
    """A domain of the lab, driven as a test would."""

    def __init__(self, lab: LibvirtLab, spec: DomainSpec) -> None:
        self.lab = lab
        self.spec = spec
        self.name = spec.name

    async def create(self) -> LabDomain:
        """Start it as a transient domain (`virsh create`)."""
        path = self.lab.workdir / f"{self.name}.xml"
        path.write_text(self.spec.xml(self.lab))
        await virsh("create", str(path))
        return self

    async def define_and_start(self) -> LabDomain:
        """Define it (persistent) and start it."""
        path = self.lab.workdir / f"{self.name}.xml"
        path.write_text(self.spec.xml(self.lab))
        await virsh("define", str(path))
        await virsh("start", self.name)
        return self

    def pid(self) -> int:
        """Its QEMU's PID (libvirt's pid file)."""
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())

    def monitor_socket(self) -> Path:
        """The QMP socket libvirt holds (free while libvirtd is down)."""
        found = list(Path("/var/lib/libvirt/qemu").glob(f"domain-*-{self.name}/monitor.sock"))
        if len(found) != 1:
            raise LibvirtLabError(f"{self.name}: {len(found)} monitor sockets")
        return found[0]

    async def qmp_while_libvirtd_is_down(self, command: str) -> None:
        """Send one QMP command on the domain's own monitor, which libvirtd left."""
        reader, writer = await asyncio.open_unix_connection(str(self.monitor_socket()))
        try:
            await reader.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                writer.write(json.dumps({"execute": cmd}).encode())
                await writer.drain()
                while True:
                    reply = json.loads(await reader.readline())
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise LibvirtLabError(f"{command}: {reply['error']}")
        finally:
            writer.close()
            await writer.wait_closed()

    async def hmp(self, *commands: str) -> None:
        """HMP commands through libvirt (taints the domain custom-monitor: tests only)."""
        script = "; ".join(
            f"qemu-monitor-command {self.name} --hmp {shlex.quote(c)}" for c in commands
        )
        await virsh(script)

    async def arm_watchdog(self) -> None:
        """The ib700 fires after about 2 s."""
        await self.hmp("o /b 0x443 14")

    async def ata_read_sector(self, lba: int) -> None:
        b = _ATA_PORT
        await self.hmp(
            f"o /b {b + 6:#x} {0xE0 | (lba >> 24) & 0x0F:#x}",
            f"o /b {b + 2:#x} 1",
            f"o /b {b + 3:#x} {lba & 0xFF:#x}",
            f"o /b {b + 4:#x} {(lba >> 8) & 0xFF:#x}",
            f"o /b {b + 5:#x} {(lba >> 16) & 0xFF:#x}",
            f"o /b {b + 7:#x} 0x20",
        )

    def taints(self) -> set[str]:
        """The taint flags libvirt logged for the domain (its log in /var/log/libvirt/qemu)."""
        log = Path(f"/var/log/libvirt/qemu/{self.name}.log")
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text(errors="replace").splitlines():
                _, sep, flag = line.partition("is tainted: ")
                if sep:
                    found.add(flag.strip())
        return found
