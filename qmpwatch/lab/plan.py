"""What one lab VM needs before QEMU starts: a run directory, its files and the command line.

The firmware is 64 KiB of ``hlt`` (`halt_firmware`): no guest OS runs, the CPU halts at the
reset vector while every emulated device keeps working. QEMU serves two QMP monitors: the
watch socket, left free for the daemon under test, and the lab's control socket.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qmpwatch.lab.build import QemuBuild, kvm_usable
from qmpwatch.lab.guestkit import DEFAULT_DIR, GuestKit, initramfs
from qmpwatch.lab.spec import Accel, GuestSpec, LabSpec

FIRMWARE_SIZE: Final = 65_536
_HLT: Final = 0xF4

#: sun_path holds 108 bytes; stay well below so a path never gets truncated.
_MAX_SOCKET_PATH: Final = 100

_DRIVE_ID: Final = "drive0"
_GUEST_DISK_ID: Final = "disk0"
AGENT_PORT_ID: Final = "agent0"
AGENT_PORT_NAME: Final = "org.qemu.guest_agent.0"
GUEST_MEMORY_MIB: Final = 128


@dataclass(frozen=True, slots=True)
class Plan:
    """One lab VM's files and QEMU's command line, as `prepare` made them.

    ``stale_watch`` identifies the file that stood at the watch path before (see
    `is_new_socket`): the socket of a QEMU killed earlier, which the new one replaces.
    """

    run_dir: Path
    watch: Path
    control: Path
    image: Path | None
    stderr_path: Path
    console: Path | None  #: the guest's serial console (a real guest only)
    stale_watch: tuple[int, int, int] | None
    argv: tuple[str, ...]


def prepare(
    build: QemuBuild,
    spec: LabSpec,
    workdir: Path | str,
    *,
    watch_socket: Path | str | None,
    disk_image: Path | str | None,
) -> Plan:
    """Create the run directory and the lab's files; work out QEMU's command line."""
    binary = build.require()
    work = Path(workdir).absolute()
    if not work.is_dir():
        raise ValueError(f"workdir does not exist: {work}")
    run_dir = _make_run_dir(work)
    try:
        watch = Path(watch_socket).absolute() if watch_socket else run_dir / "watch.sock"
        control = run_dir / "ctl.sock"
        _check_socket_path(watch)
        _check_socket_path(control)
        image: Path | None = None
        if spec.blkdebug is not None:
            image = Path(disk_image).absolute() if disk_image else work / f"{spec.name}.img"
        argv = [binary, *build.qemu_args()]
        argv += _command_line(spec, run_dir=run_dir, watch=watch, control=control, image=image)
        if spec.dial_in is not None:
            argv += dial_in_args(spec.dial_in, build.version())
        return Plan(
            run_dir=run_dir,
            watch=watch,
            control=control,
            image=image,
            stderr_path=run_dir / "qemu.log",
            console=run_dir / "console.log" if spec.guest is not None else None,
            stale_watch=_file_identity(watch),
            argv=tuple(argv),
        )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def dial_in_args(path: Path | str, version: tuple[int, int, int]) -> list[str]:
    """QEMU options that make it dial in to a qmpwatch `[[listen]]` socket at `path`, and
    dial again a second after it loses the connection: `reconnect=1` up to QEMU 9.1,
    `reconnect-ms=1000` from 9.2 on (7.2 knows only the first; 10.0 takes both)."""
    again = "reconnect-ms=1000" if version >= (9, 2, 0) else "reconnect=1"
    return [
        "-chardev",
        f"socket,id=qmpwatch,path={_opt(path)},{again}",
        "-mon",
        "chardev=qmpwatch,mode=control",
    ]


def _command_line(
    spec: LabSpec,
    *,
    run_dir: Path,
    watch: Path,
    control: Path,
    image: Path | None,
) -> list[str]:
    """Write the lab's files and return QEMU's options (the build's own come first)."""
    if spec.guest is None:
        boot = ["-bios", _opt(halt_firmware(run_dir / "halt.bin"))]
    else:
        boot = _guest_args(spec.guest, run_dir)
    argv = [
        "-machine",
        "pc",
        *_accel_args(spec.accel),
        *boot,
        "-nodefaults",
        "-display",
        "none",
        "-name",
        spec.name,
    ]
    if spec.uuid is not None:
        argv += ["-uuid", spec.uuid]
    if spec.no_shutdown:
        argv.append("-no-shutdown")
    argv += ["-qmp", f"unix:{watch},server=on,wait=off"]
    argv += ["-qmp", f"unix:{control},server=on,wait=off"]
    if spec.watchdog_action is not None and spec.guest is not None:
        argv += ["-device", "i6300esb", "-action", f"watchdog={spec.watchdog_action}"]
    elif spec.watchdog_action is not None:
        # -action watchdog= (QEMU 6.0 and later) supersedes -watchdog-action (which 7.2 and
        # 10.0 still accept); the lab runs the form current on every build it supports.
        argv += ["-device", "ib700", "-action", f"watchdog={spec.watchdog_action}"]
    if spec.blkdebug is not None:
        assert image is not None
        bd = spec.blkdebug
        if not image.exists():
            with image.open("wb") as f:
                f.truncate(bd.image_size)
        config = run_dir / "blkdebug.conf"
        if ":" in str(config):
            raise ValueError(f"blkdebug needs a config path without ':': {config}")
        config.write_text(bd.config_text())
        argv += [
            "-drive",
            f"file=blkdebug:{_opt(config)}:{_opt(image)},if=none,format=raw,id={_DRIVE_ID},"
            f"rerror={bd.rerror},werror={bd.werror}",
            "-device",
            f"ide-hd,drive={_DRIVE_ID},bus=ide.0",
        ]
    if spec.vnc_display is not None:
        argv += ["-vnc", f"127.0.0.1:{spec.vnc_display}"]
    if spec.spice_port is not None:
        argv += ["-spice", f"port={spec.spice_port},addr=127.0.0.1,disable-ticketing=on"]
    argv += spec.extra_args
    return argv


def _guest_args(guest: GuestSpec, run_dir: Path) -> list[str]:
    """A real guest: the kit's kernel and initramfs, its console, devices; QEMU waits (-S)."""
    kit = GuestKit.find(guest.kit_dir or DEFAULT_DIR)
    # A throwaway guest needs no speculative-execution mitigations: TCG boots it in about
    # half the time without them.
    words = ["console=ttyS0", "quiet", "mitigations=off", "no_timer_check"]
    words.append(f"qw.do={guest.action}")
    words += [f"qw.{key}={value}" for key, value in guest.options]
    if guest.reboot_after_panic_s is not None:
        words.append(f"panic={guest.reboot_after_panic_s}")
    argv = [
        "-S",
        "-m",
        str(GUEST_MEMORY_MIB),
        "-kernel",
        _opt(kit.vmlinux),
        "-initrd",
        _opt(initramfs(kit)),
        "-append",
        " ".join(words),
        "-chardev",
        f"file,id=console,path={_opt(run_dir / 'console.log')}",
        "-serial",
        "chardev:console",
    ]
    if guest.panic_action is not None:
        argv += ["-device", "pvpanic", "-action", f"panic={guest.panic_action}"]
    if guest.disk is not None:
        argv += [
            "-drive",
            f"file={_opt(guest.disk)},if=none,format=raw,id={_GUEST_DISK_ID},werror={guest.werror}",
            "-device",
            f"virtio-blk-pci,drive={_GUEST_DISK_ID}",
        ]
    if guest.agent_port:
        argv += [
            "-device",
            "virtio-serial",
            "-chardev",
            "null,id=agent",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},id={AGENT_PORT_ID}",
        ]
    return argv


def halt_firmware(path: Path | str) -> Path:
    """Write a 64 KiB BIOS image of ``hlt`` instructions to ``path`` and return it."""
    target = Path(path)
    target.write_bytes(bytes([_HLT]) * FIRMWARE_SIZE)
    return target


#: A KVM guest not at /init by then is no better than TCG (~2.3 s); a host whose KVM cannot
#: run Linux guests (nested PVM: an emulation failure) fails sooner.
KVM_PROBE_S: Final = 10.0


def guest_accel(build: QemuBuild, guest: GuestSpec) -> Accel:
    """``kvm`` where it runs Linux guests (one probe boot per build and host boot, its
    answer kept beside the kit), else ``tcg``."""
    if not kvm_usable():
        return "tcg"
    kit = GuestKit.find(guest.kit_dir or DEFAULT_DIR)
    binary = build.require()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    key = hashlib.sha256(f"{binary}\0{build.version()}\0{boot_id}".encode()).hexdigest()[:16]
    answer = kit.root.parent / f"accel-{key}"
    if answer.is_file():
        return "kvm" if answer.read_text().strip() == "kvm" else "tcg"
    argv = [binary, *build.qemu_args(), "-machine", "pc", "-accel", "kvm", "-nodefaults"]
    argv += ["-display", "none", "-m", str(GUEST_MEMORY_MIB), "-no-reboot", "-kernel"]
    argv += [str(kit.vmlinux), "-initrd", str(initramfs(kit)), "-serial", "stdio", "-append"]
    argv += ["console=ttyS0 quiet qw.do=poweroff"]
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=KVM_PROBE_S, env=build.qemu_env(), check=False
        )
        works = done.returncode == 0 and b"QW: poweroff" in done.stdout
    except subprocess.TimeoutExpired:
        works = False
    accel: Accel = "kvm" if works else "tcg"
    fd, tmp = tempfile.mkstemp(dir=answer.parent, prefix=".accel-")
    with os.fdopen(fd, "w") as f:
        f.write(accel + "\n")
    os.rename(tmp, answer)
    return accel


def _accel_args(accel: Accel) -> list[str]:
    if accel == "tcg" or (accel == "auto" and not kvm_usable()):
        return ["-accel", "tcg"]
    if accel == "kvm":
        return ["-accel", "kvm"]
    # QEMU tries accelerators in order: if KVM cannot create a VM here, TCG takes over.
    return ["-accel", "kvm", "-accel", "tcg"]


def _opt(value: Path | str) -> str:
    """A value inside a QEMU ``key=value,...`` option string (commas are doubled)."""
    return str(value).replace(",", ",,")


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) >= _MAX_SOCKET_PATH:
        raise ValueError(f"unix socket path too long (>= {_MAX_SOCKET_PATH} bytes): {path}")
    if "," in str(path):
        raise ValueError(f"unix socket path must not contain a comma: {path}")


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def is_new_socket(path: Path, stale: tuple[int, int, int] | None) -> bool:
    """Whether a socket stands at ``path`` that is not the file ``stale`` identified."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino, st.st_ctime_ns) != stale


def _make_run_dir(work: Path) -> Path:
    """A fresh private directory, short enough for unix socket paths inside it."""
    # mkdtemp adds "qlab-" + 8 characters; the longest name inside is "watch.sock".
    if len(os.fsencode(work)) + len("/qlab-XXXXXXXX/watch.sock") < _MAX_SOCKET_PATH:
        base = work
    else:
        tmp = Path(tempfile.gettempdir())
        base = tmp if len(os.fsencode(tmp)) < 40 else Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="qlab-", dir=base))
