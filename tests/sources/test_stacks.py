"""Where operators' VMs live: the README's dial-in monitor for each stack, on QEMU's command
line as that stack composes it, watched through `[[listen]]` by the real daemon; and a
CloudStack domain (libvirt) watched through `[[libvirt]]`.

The composed command lines keep what matters for QEMU's monitor and events (the stack's own
monitors, `-S`, `-name`, `-nographic`, the panic action); a test stands in for the guest OS with
the halt firmware and runs QEMU in the foreground where a stack daemonizes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmpwatch.lab import QemuBuild, halt_firmware
from qmpwatch.lab.libvirt import LAB_PREFIX, URI, DomainSpec, LabDomain, LibvirtLab, virsh
from tests.support.daemon_harness import FAST_CONNECT, DaemonProcess, write_config

LISTEN = "qmp.sock"


def dial_in(listen: Path, build: QemuBuild | None = None) -> str:
    """The README's dial-in monitor, as the QEMU build (default: the one under test) spells
    `reconnect`."""
    build = build or QemuBuild.from_environ()
    reconnect = "reconnect-ms=1000" if build.version() >= (9, 2, 0) else "reconnect=1"
    return (
        f"-chardev socket,id=qmpwatch,path={listen},{reconnect} -mon chardev=qmpwatch,mode=control"
    )


@contextlib.asynccontextmanager
async def qemu(argv: Sequence[str], workdir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """QEMU of the build under test with `argv` (and the halt firmware for a guest), killed
    at the end of the block."""
    build = QemuBuild.from_environ()
    firmware = halt_firmware(workdir / "halt.bin")
    proc = await asyncio.create_subprocess_exec(
        build.require(), *build.qemu_args(), "-bios", str(firmware), *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=build.qemu_env(),
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def watched_until_sigterm(
    daemon: DaemonProcess, proc: asyncio.subprocess.Process, vm: str
) -> tuple[dict[str, object], dict[str, object]]:
    """The VM connects under `vm`; SIGTERM to QEMU is its clean end. (vm_connected,
    vm_disconnected)"""
    try:
        connected = await daemon.wait_for("vm_connected", vm=vm, timeout=30)
    except AssertionError:
        assert proc.stderr is not None
        if proc.returncode is not None:
            raise AssertionError((await proc.stderr.read()).decode()) from None
        raise
    proc.send_signal(signal.SIGTERM)
    ended = await daemon.wait_for("vm_disconnected", vm=vm)
    return connected, ended


def listen_config(tmp_path: Path, listen: Path) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"listen": [{"socket": str(listen)}]},
    )


@pytest.mark.qemu
async def test_incus_raw_qemu_is_watched(tmp_path: Path, sock_dir: Path) -> None:
    """Incus: -S, its own monitor, panic=exit-failure, then raw.qemu split as a shell does;
    Incus starts the CPUs through its monitor: qmpwatch watches `-name`, sees the RESUME."""
    listen, incus_monitor = sock_dir / LISTEN, sock_dir / "qemu.monitor"
    raw_qemu = dial_in(listen)
    argv = [
        "-S", "-name", "incus01", "-uuid", "2f6c2a8e-8c07-4c64-9d0c-6e7f3a4a4a01",
        "-nodefaults", "-no-user-config", "-nographic", "-action", "panic=exit-failure",
        "-chardev", f"socket,id=monitor,path={incus_monitor},server=on,wait=off",
        "-mon", "chardev=monitor,mode=control",
        *shlex.split(raw_qemu),
    ]  # fmt: skip
    async with (
        DaemonProcess.start(listen_config(tmp_path, listen)) as daemon,
        qemu(argv, sock_dir) as proc,
    ):
        first = await daemon.wait_for("vm_connected", vm="incus01", timeout=30)
        incus = QMPClient("incus")
        await incus.connect(str(incus_monitor))
        try:
            await incus.execute("cont")
        finally:
            await incus.disconnect()
        await daemon.wait_for("qmp_event", vm="incus01", qmp="RESUME")
        _, ended = await watched_until_sigterm(daemon, proc, "incus01")
    assert first["status"] == "prelaunch"
    assert first["pid"] == proc.pid
    assert (ended["cause"], ended["reason"]) == ("shutdown", "it shut down (host-signal)")
    assert not daemon.find("alert", vm="incus01")


@pytest.mark.qemu
async def test_ganeti_kvm_extra_is_watched(tmp_path: Path, sock_dir: Path) -> None:
    """Ganeti: its monitor and two QMP sockets in its control directory, then kvm_extra split
    on spaces: qmpwatch watches the instance by name, without -no-shutdown."""
    listen, ctrl = sock_dir / LISTEN, sock_dir / "ctrl"
    ctrl.mkdir()
    name = "web01.example.com"
    kvm_extra = dial_in(listen)
    argv = [
        "-name", name, "-m", "128", "-smp", "1", "-nodefaults", "-display", "none",
        "-monitor", f"unix:{ctrl}/{name}.monitor,server=on,wait=off",
        "-qmp", f"unix:{ctrl}/{name}.qmp,server=on,wait=off",
        "-qmp", f"unix:{ctrl}/{name}.kvmd,server=on,wait=off",
        *kvm_extra.split(" "),
    ]  # fmt: skip
    async with (
        DaemonProcess.start(listen_config(tmp_path, listen)) as daemon,
        qemu(argv, sock_dir) as proc,
    ):
        connected, ended = await watched_until_sigterm(daemon, proc, name)
    assert (connected["status"], connected["no_shutdown"]) == ("running", False)
    assert ended["cause"] == "shutdown"


@pytest.mark.qemu
async def test_nomad_qemu_args_are_watched(tmp_path: Path, sock_dir: Path) -> None:
    """Nomad's QEMU driver: -name after the image file, its drive, -nographic, its graceful-
    shutdown monitor, then `args` as they are: the task's own -name wins (QEMU and qmpwatch
    take the last)."""
    listen, taskdir = sock_dir / LISTEN, sock_dir / "task"
    taskdir.mkdir()
    image = taskdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    args = ["-name", "web-0", *shlex.split(dial_in(listen))]  # the README's args list
    argv = [
        "-machine", "type=pc,accel=tcg", "-name", image.name, "-m", "128M",
        "-drive", f"file={image},if=ide,format=raw", "-nographic",
        "-monitor", f"unix:{taskdir}/qemu-monitor.sock,server=on,wait=off",
        *args,
    ]  # fmt: skip
    async with (
        DaemonProcess.start(listen_config(tmp_path, listen)) as daemon,
        qemu(argv, sock_dir) as proc,
    ):
        connected, ended = await watched_until_sigterm(daemon, proc, "web-0")
    assert connected["status"] == "running"
    assert ended["cause"] == "shutdown"
    assert not daemon.find("vm_connected", vm=image.name)


@pytest.mark.libvirt
async def test_opennebula_raw_data_is_watched(
    tmp_path: Path, sock_dir: Path, libvirt_lab: LibvirtLab
) -> None:
    """OpenNebula: a libvirt domain `one-<ID>` with the RAW DATA's qemu:commandline: qmpwatch
    watches it through [[listen]], with libvirt's -no-shutdown."""
    listen = sock_dir / LISTEN
    name = f"{LAB_PREFIX}one-{secrets.token_hex(2)}"  # one-<VMID>, in the lab's namespace
    system_qemu = QemuBuild.from_environ({})  # libvirt runs the system's QEMU
    raw_data_args = shlex.split(dial_in(listen, system_qemu))  # the RAW DATA's qemu:arg values
    spec = DomainSpec(name, extra_args=tuple(raw_data_args))
    async with DaemonProcess.start(listen_config(tmp_path, listen)) as daemon:
        dom = await LabDomain(libvirt_lab, spec).create()
        try:
            connected = await daemon.wait_for("vm_connected", vm=name, timeout=30)
            if connected["status"] == "prelaunch":  # libvirt starts QEMU with -S, then cont
                await daemon.wait_for("qmp_event", vm=name, qmp="RESUME")
        finally:
            await virsh("destroy", dom.name)
        ended = await daemon.wait_for("vm_disconnected", vm=name)
    assert connected["status"] in ("prelaunch", "running")
    assert connected["no_shutdown"] is True
    assert ended["cause"] == "shutdown"  # virsh destroy: SIGTERM, SHUTDOWN host-signal, EOF


@pytest.mark.libvirt
async def test_a_cloudstack_domain_is_watched_through_libvirt(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """CloudStack: a domain named as its user VMs are, with its i6300esb watchdog whose action
    is none, watched through [[libvirt]] with domains = ["i-*"]; a system VM is not."""
    run = secrets.token_hex(2)
    user_vm = f"i-2-{run}-VM"
    system_vm = f"s-{run}-VM"
    watchdog = "<watchdog model='i6300esb' action='none'/>"
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"connect": FAST_CONNECT},
        arrays={"libvirt": [{"uri": URI, "domains": ["i-*"]}]},
    )
    doms = [
        await LabDomain(libvirt_lab, DomainSpec(n, extra_devices=(watchdog,))).create()
        for n in (user_vm, system_vm)
    ]
    try:
        async with DaemonProcess.start(config) as daemon:
            connected = await daemon.wait_for("vm_connected", vm=user_vm, timeout=30)
    finally:
        for dom in doms:
            await virsh("destroy", dom.name)
    assert connected["status"] == "running"
    assert not daemon.find("vm_connected", vm=system_vm)
