"""A real Linux guest for the lab: a Debian kernel and a busybox initramfs, made from Debian
packages with nothing installed on the machine (`fetch_kit`, `initramfs`).

`fetch_kit(DIR)` downloads the kernel package that ``linux-image-amd64`` depends on (the
generic flavour: ``-cloud`` has no watchdog drivers) and ``busybox-static`` (from the apt
cache when it holds them, else ``apt-get download``), and keeps of them only what a guest
needs: the uncompressed ``vmlinux`` (QEMU boots it through its PVH note, ~2.3 s to ``/init``
under TCG against ~5.3 s for the bzImage), the modules of the lab's devices and busybox.
It builds in a private directory and renames it into place, so two runs at once both end
with one complete kit. ``python -m qmpwatch.lab.fetch_guest DIR`` runs it (``make test`` does).

`initramfs(kit)` writes the newc cpio (gzip) with busybox, the modules in dependency order
and the `/init` below, under a name that hashes its content (so a changed script never runs
a stale image). The guest's scenario comes from its kernel command line: ``qw.do=ACTION``
(guest-facts.md has the events QEMU sends for each). Design notes: docs/real-guests.md.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import lzma
import os
import pwd
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qmpwatch.lab.errors import LabError

KERNEL_META: Final = "linux-image-amd64"
BUSYBOX: Final = "busybox-static"
APT_ARCHIVES: Final = Path("/var/cache/apt/archives")
DEFAULT_DIR: Final = Path(".cache/guest")

#: Modules kept from the kernel package (paths under lib/modules/VERSION/kernel/): the drivers
#: of the lab's guest devices. Their dependencies must be among them (checked).
_MODULE_PATHS: Final = (
    "drivers/virtio/",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
    "drivers/misc/pvpanic/",
    "drivers/watchdog/watchdog.ko",
    "drivers/watchdog/i6300esb.ko",
    "drivers/acpi/button.ko",
    "drivers/input/evdev.ko",
)
#: What /init loads, in this order after each one's dependencies (no ib700wdt: it claims
#: /dev/watchdog even without its device).
_LOAD: Final = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "pvpanic_mmio",
    "pvpanic_pci",
    "i6300esb",
    "button",
    "evdev",
)
_MODINFO_DEPENDS: Final = re.compile(rb"\x00depends=([^\x00]*)\x00")
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"

#: The guest's /init: reads ``qw.do`` from /proc/cmdline and says what it does on the serial
#: console (``QW: ...`` lines, which the lab waits for).
INIT_SCRIPT: Final = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "QW: $*" > /dev/console; }
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^qw\.$1=//p" | tail -n 1; }
while read -r module params; do
    insmod /lib/modules/$module.ko $params 2>/dev/null
done < /modules.load
acpid -c /etc/acpi -l /tmp/acpid.log 2>/dev/null
do=$(arg do)
# The i6300esb keeps a flag across the reset it caused (the driver's bootstatus): a guest
# its watchdog reset says so and runs on, rather than letting it fire again.
if [ "$(cat /sys/class/watchdog/watchdog0/bootstatus 2>/dev/null)" != "" ] &&
    [ "$(cat /sys/class/watchdog/watchdog0/bootstatus)" != 0 ]; then
    say "reset by the watchdog"
    do=idle
fi
say "init $do"
agent_port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && echo /dev/${p##*/}
    done
}
case "$do" in
panic)
    say "panic"
    echo c > /proc/sysrq-trigger ;;
watchdog)
    exec 3> /dev/watchdog
    say "watchdog armed; fed once, then no more"
    echo 1 >&3 ;;
fill)
    say "fill /dev/vda"
    dd if=/dev/zero of=/dev/vda bs=1M count=$(arg mib) oflag=direct 2>/dev/null
    say "fill done rc=$?" ;;
poweroff)
    say "poweroff"
    poweroff -f ;;
reboot)
    say "reboot"
    reboot -f ;;
agent)
    port=$(agent_port)
    say "agent port $port"
    for step in $(arg agent | tr , ' '); do
        case $step in
        open) exec 4<> $port; say "agent open" ;;
        close) exec 4>&-; say "agent closed" ;;
        *) sleep $step ;;
        esac
    done ;;
esac
say "idle"
while :; do sleep 3600; done
"""
#: busybox acpid runs /etc/acpi/PWRF/00000080 for the power button (QMP system_powerdown).
_POWER_BUTTON: Final = "#!/bin/sh\necho 'QW: power button' > /dev/console\npoweroff -f\n"


@dataclass(frozen=True, slots=True)
class GuestKit:
    """A fetched kit: the kernel to boot and what the initramfs is made of."""

    root: Path  #: DIR/kit

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def busybox(self) -> Path:
        return self.root / "busybox"

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @classmethod
    def find(cls, directory: Path | str = DEFAULT_DIR) -> GuestKit:
        """The kit `fetch_kit` made in `directory`; `LabError` saying how to make it if none."""
        kit = cls(Path(directory).absolute() / "kit")
        if not (kit.root / "complete").is_file():
            raise LabError(
                f"no guest kit in {directory}: run `python -m qmpwatch.lab.fetch_guest "
                f"{directory}` (`make test` does)"
            )
        return kit


def fetch_kit(directory: Path | str = DEFAULT_DIR) -> GuestKit:
    """Make the kit in `directory` unless it is there (see the module docstring)."""
    base = Path(directory).absolute()
    final = base / "kit"
    if (final / "complete").is_file():
        return GuestKit(final)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kit-", dir=base))
    try:
        debs = work / "debs"
        debs.mkdir()
        kernel_pkg = _kernel_package()
        kernel_deb = _download(kernel_pkg, debs)
        busybox_deb = _download(BUSYBOX, debs)
        new = work / "kit"
        new.mkdir()
        version = _extract_kernel(kernel_deb, new)
        _extract_busybox(busybox_deb, new)
        (new / "complete").write_text(f"{kernel_pkg} {version}\n")
        shutil.rmtree(debs)
        try:
            new.rename(final)
        except OSError:
            if not (final / "complete").is_file():  # not another run's complete kit: ours failed
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return GuestKit(final)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _kernel_package() -> str:
    """The versioned kernel package that linux-image-amd64 depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    match = re.search(r"Depends: (linux-image-\S+-amd64)\b", out)
    if match is None:
        raise LabError(f"apt-cache depends {KERNEL_META}: no kernel package in {out!r}")
    return match.group(1)


def _download(package: str, into: Path) -> Path:
    """The package's candidate .deb: copied from the apt cache if there, else downloaded."""
    show = _run(["apt-cache", "show", "--no-all-versions", package])
    version = re.search(r"^Version: (\S+)", show, re.MULTILINE)
    if version is not None:
        cached = APT_ARCHIVES / f"{package}_{version.group(1).replace(':', '%3a')}_amd64.deb"
        if cached.is_file():
            return Path(shutil.copy(cached, into))
    user = pwd.getpwuid(os.getuid()).pw_name
    _run(["apt-get", "-qq", "-o", f"APT::Sandbox::User={user}", "download", package], cwd=into)
    found = glob.glob(str(into / f"{glob.escape(package)}_*.deb"))
    if len(found) != 1:
        raise LabError(f"apt-get download {package}: expected one .deb, found {found}")
    return Path(found[0])


@contextlib.contextmanager
def _members(deb: Path) -> Iterator[tarfile.TarFile]:
    """The package's files as a tar stream (``dpkg-deb --fsys-tarfile``), read once."""
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise LabError(f"dpkg-deb failed: {exc}") from exc
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    except tarfile.TarError as exc:
        raise LabError(f"{deb.name}: not a readable package: {exc}") from exc
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def _extract_kernel(deb: Path, into: Path) -> str:
    """vmlinux (from the bzImage's xz payload) and the lab's modules; returns the version."""
    modules: dict[str, bytes] = {}
    vmlinuz = b""
    version = ""
    with _members(deb) as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isfile():
                continue
            if name.startswith("boot/vmlinuz-"):
                vmlinuz = _read(tar, member)
                version = name.removeprefix("boot/vmlinuz-")
                continue
            match = re.fullmatch(r"lib/modules/[^/]+/kernel/(.+\.ko)", name)
            if match and any(match.group(1).startswith(p) for p in _MODULE_PATHS):
                modules[Path(name).stem.replace("-", "_")] = _read(tar, member)
    if not vmlinuz:
        raise LabError(f"{deb.name}: no boot/vmlinuz-*")
    (into / "vmlinux").write_bytes(_vmlinux(vmlinuz, deb.name))
    order = _load_order(modules)
    (into / "modules").mkdir()
    for name in order:
        (into / "modules" / f"{name}.ko").write_bytes(modules[name])
    (into / "modules" / "order").write_text("\n".join(order) + "\n")
    return version


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    assert stream is not None
    return stream.read()


def _vmlinux(bzimage: bytes, what: str) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz (Debian's)."""
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        raise LabError(f"{what}: the bzImage has no xz payload")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"{what}: the bzImage's payload is not an ELF kernel")
    return elf


def _load_order(modules: dict[str, bytes]) -> list[str]:
    """`_LOAD` and their dependencies, each after what it depends on."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in modules:
            raise LabError(f"module {name} (needed by {' <- '.join(chain)}) is not in the kit")
        match = _MODINFO_DEPENDS.search(modules[name])
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep, (*chain, name))
        order.append(name)

    for name in _LOAD:
        visit(name, ())
    return order


def _extract_busybox(deb: Path, into: Path) -> None:
    with _members(deb) as tar:
        for member in tar:
            if member.isfile() and member.name.lstrip("./") == "bin/busybox":
                (into / "busybox").write_bytes(_read(tar, member))
                return
    raise LabError(f"{deb.name}: no bin/busybox")


# ---- the initramfs ---------------------------------------------------------------------------


def initramfs(kit: GuestKit, into: Path | str | None = None) -> Path:
    """The kit's initramfs (written once per content; see the module docstring)."""
    files = _initramfs_files(kit)
    digest = hashlib.sha256()
    for path, (mode, data) in sorted(files.items()):
        digest.update(f"{path}\0{mode}\0{len(data)}\0".encode())
        digest.update(data)
    target = Path(into or kit.root.parent) / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            out.write(_cpio(files))
        os.rename(tmp, target)  # atomic: a racing run writes the same bytes
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _initramfs_files(kit: GuestKit) -> dict[str, tuple[int, bytes]]:
    """Path -> (mode, content) of every entry; a mode of a directory or node has no content."""
    busybox = kit.busybox.read_bytes()
    order = (kit.modules / "order").read_text().split()
    params = {"i6300esb": " heartbeat=2"}  # WATCHDOG ~2 s after the last write
    files: dict[str, tuple[int, bytes]] = {
        "dev": (0o040755, b""),
        "dev/console": (0o020600, b""),  # char 5:1: /init has no stdout without it
        "proc": (0o040755, b""),
        "sys": (0o040755, b""),
        "tmp": (0o041777, b""),
        "bin": (0o040755, b""),
        "bin/busybox": (0o100755, busybox),
        "init": (0o100755, INIT_SCRIPT.encode()),
        "modules.load": (0o100644, "".join(f"{m}{params.get(m, '')}\n" for m in order).encode()),
        "etc": (0o040755, b""),
        "etc/acpi": (0o040755, b""),
        "etc/acpi/PWRF": (0o040755, b""),
        "etc/acpi/PWRF/00000080": (0o100755, _POWER_BUTTON.encode()),
        "lib": (0o040755, b""),
        "lib/modules": (0o040755, b""),
    }
    for applet in ("sh", *_APPLETS):
        files[f"bin/{applet}"] = (0o120777, b"busybox")
    for name in order:
        files[f"lib/modules/{name}.ko"] = (0o100644, (kit.modules / f"{name}.ko").read_bytes())
    return files


_APPLETS: Final = [
    "mount",
    "cat",
    "tr",
    "sed",
    "tail",
    "cut",
    "insmod",
    "acpid",
    "echo",
    "sleep",
    "dd",
    "poweroff",
    "reboot",
    "ls",
]


def _cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc archive of `files` (directories before what they hold)."""
    out = io.BytesIO()
    for ino, (path, (mode, data)) in enumerate(sorted(files.items()), start=1):
        rdev = (5, 1) if path == "dev/console" else (0, 0)
        _cpio_entry(out, ino, path, mode, data, rdev)
    _cpio_entry(out, 0, "TRAILER!!!", 0, b"", (0, 0))
    return out.getvalue()


def _cpio_entry(
    out: io.BytesIO, ino: int, path: str, mode: int, data: bytes, rdev: tuple[int, int]
) -> None:
    name = path.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
    out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + name)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))
