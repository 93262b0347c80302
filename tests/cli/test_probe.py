"""`qmpwatch check-config --probe`: sockets (a real QEMU's monitor), the state directory and
the sinks' hosts, checked as the user who runs it; relative socket paths refused always."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import secrets
import socket
import sys
from pathlib import Path

import pytest

from qmpwatch.cli.main import main
from qmpwatch.cli.probe import probe_state_dir, probe_tcp
from qmpwatch.lab import LabSpec, LabVM
from qmpwatch.lab.libvirt import LAB_PREFIX, URI, DomainSpec, LabDomain, LibvirtLab, virsh
from tests.support.alert_fixtures import receiving
from tests.support.daemon_harness import DaemonProcess, lab_config, write_config
from tests.support.ports import refusing_port

NOBODY = 65534


async def check_config(config: Path, *prefix: str) -> tuple[int, str, str]:
    """Run `[prefix...] qmpwatch check-config --probe -c CONFIG`; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "qmpwatch", "check-config", "--probe", "-c", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def problems(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def bound_not_listening(path: Path) -> socket.socket:
    """A unix socket file nobody listens on (a QEMU that died and left its socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_relative_socket_paths_are_refused_by_plain_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --probe too: a relative socket or glob is a problem, the VM named by index and
    name, and check-config exits 2."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[vm]]\nname = "web01"\nsocket = "/run/qemu/web01.qmp"\n'
        '[[vm]]\nname = "web02"\nsocket = "web02.qmp"\n'
        '[[discover]]\nglob = "run/*.qmp"\n'
    )
    assert main(["check-config", "-c", str(cfg)]) == 2
    assert problems(capsys.readouterr().err) == [
        'vm[1] web02: socket: must be an absolute path, got "web02.qmp"',
        'discover[0].glob: must be an absolute path, got "run/*.qmp"',
    ]


@pytest.mark.qemu
async def test_probe_of_a_good_world_passes_and_leaves_nothing_behind(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A real QEMU's monitor, a state_dir still to be created, two listening receivers and a
    command: exit 0, probe OK; no state_dir created, and the monitor serves the next client."""
    state_dir = tmp_path / "not-yet" / "state"
    async with (
        receiving() as hook,
        receiving() as am,
        LabVM.start(LabSpec(name="web01"), sock_dir) as vm,
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=state_dir,
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
            arrays={
                "alert.webhook": [{"url": hook.url}],
                "alert.alertmanager": [{"url": f"http://127.0.0.1:{am.port}"}],
                "alert.exec": [{"command": ["true"]}],
            },
        )
        before = sorted(os.listdir(tmp_path))
        status, out, err = await check_config(cfg)
        assert (status, err) == (0, "")
        assert out.splitlines()[-1] == f"{cfg}: probe OK (1 [[vm]] socket(s), state_dir, 3 sink(s))"
        assert sorted(os.listdir(tmp_path)) == before
        assert hook.requests == []  # a TCP connect, no request
        assert am.requests == []
        # QEMU took the probe's connection and dropped it: the daemon attaches as usual
        async with DaemonProcess.start(lab_config(tmp_path, vm, file="d.toml")) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            assert daemon.find("vm_connect_failed") == []


@pytest.mark.qemu
async def test_probe_beside_the_daemon_does_not_keep_it_out(tmp_path: Path, sock_dir: Path) -> None:
    """While the daemon holds the monitor the probe's connection waits in QEMU's listen queue
    (it still counts as connectable); when a new daemon attaches after the first one left, it
    gets in at the first attempt."""
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        cfg = lab_config(tmp_path, vm)
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="web01")
            status, _, err = await check_config(cfg)
            assert (status, err) == (0, "")
        async with DaemonProcess.start(cfg) as again:
            await again.wait_for("vm_connected", vm="web01")
            assert again.find("vm_connect_failed") == []
            await vm.stop()
            await again.wait_for("qmp_event", vm="web01", qmp="STOP")


async def test_probe_names_each_problem(tmp_path: Path, sock_dir: Path) -> None:
    """Missing, not a socket, refused; a state_dir under a file; a receiver that refuses; a
    command that does not exist: each one line naming its VM or key, exit 1."""
    (sock_dir / "file.qmp").write_text("a regular file\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    found = sock_dir / "found"
    found.mkdir()
    with (
        refusing_port() as closed,
        bound_not_listening(sock_dir / "dead.qmp"),
        bound_not_listening(found / "web04.qmp"),
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=blocker / "state",
            vms=[
                {"name": "web01", "socket": str(sock_dir / "missing.qmp")},
                {"name": "web02", "socket": str(sock_dir / "file.qmp")},
                {"name": "web03", "socket": str(sock_dir / "dead.qmp")},
            ],
            discover=[{"glob": str(found / "*.qmp")}],
            arrays={
                "alert.alertmanager": [{"url": f"http://127.0.0.1:{closed}/secret-path"}],
                "alert.exec": [{"command": ["/nonexistent/page-oncall"]}],
            },
        )
        status, out, err = await check_config(cfg)
    assert status == 1
    assert f"{cfg}: OK" in out  # the configuration itself is valid
    assert problems(err) == [
        f"vm[0] web01: socket: {sock_dir}/missing.qmp does not exist (is the VM running?)",
        f"vm[1] web02: socket: {sock_dir}/file.qmp is not a unix socket",
        f"vm[2] web03: socket: {sock_dir}/dead.qmp: connection refused: nothing listens on it "
        "(QEMU gone, its file left)",
        f"discover[0] web04: socket: {found}/web04.qmp: connection refused: nothing listens on "
        "it (QEMU gone, its file left)",
        f"daemon.state_dir: {blocker}/state cannot be created: {blocker} is not a directory",
        f"alert.alertmanager[0]: url: http://127.0.0.1:{closed}: cannot connect: "
        "Connection refused",
        "alert.exec[0]: command: /nonexistent/page-oncall: no such file",
    ]


@pytest.mark.qemu
async def test_probe_as_a_user_without_access(tmp_path: Path, sock_dir: Path) -> None:
    """As a user the socket's mode shuts out (root without its override of file permissions,
    so the modes apply): a real QEMU monitor that is srwxr-x--- and not the user's is
    "permission denied" with its mode and owner, and a state file the user cannot write is
    named too."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    outbox = state_dir / "outbox.sqlite3"
    outbox.write_bytes(b"")
    os.chown(outbox, NOBODY, NOBODY)
    outbox.chmod(0o644)
    async with LabVM.start(LabSpec(name="web01"), sock_dir) as vm:
        os.chown(vm.watch_socket, NOBODY, NOBODY)
        vm.watch_socket.chmod(0o750)
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=state_dir,
            vms=[{"name": "web01", "socket": str(vm.watch_socket)}],
        )
        no_override = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
        status, _, err = await check_config(cfg, *no_override)
    owner = f"{pwd.getpwuid(NOBODY).pw_name}:{grp.getgrgid(NOBODY).gr_name}"
    assert status == 1, err
    assert problems(err) == [
        f"vm[0] web01: socket: {vm.watch_socket}: permission denied (as user root): the socket "
        f"is srwxr-x--- {owner}; connecting needs write access (run qmpwatch in the socket's "
        "group, with group write permission)",
        f"daemon.state_dir: {outbox}: cannot open for writing: Permission denied (as user root)",
    ]


async def test_a_host_that_does_not_answer_is_timed_out() -> None:
    """A host whose listen queue is full drops the SYN: the probe gives up at its timeout."""
    with socket.socket() as server, socket.socket() as first:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        first.connect(server.getsockname())  # the queue (0 + 1) is now full
        port = server.getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        problem = await probe_tcp(f"http://127.0.0.1:{port}/", 0.3)
        assert problem == f"http://127.0.0.1:{port} did not answer a TCP connect within 0.3 s"
        assert loop.time() - started < 2


def test_state_dir_probe_creates_nothing(tmp_path: Path) -> None:
    """An existing writable directory and one still to be created both pass; neither probe
    leaves a file or directory behind."""
    assert probe_state_dir(tmp_path) is None
    assert probe_state_dir(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert probe_state_dir(tmp_path / "file") == f"{tmp_path}/file is not a directory"


async def test_probe_checks_listen_directories_groups_and_libvirt(tmp_path: Path) -> None:
    """A [[listen]] in a directory that does not exist, one with a group that does not exist,
    and a [[libvirt]] URI nobody answers: each is a problem naming its entry; the summary on
    success names every source."""
    good = tmp_path / "run"
    good.mkdir()
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        arrays={
            "listen": [
                {"socket": str(tmp_path / "nowhere" / "qmp.sock")},
                {"socket": str(good / "qmp.sock"), "group": "no-such-group-qw"},
            ],
            "libvirt": [{"uri": f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"}],
        },
    )
    status, _, err = await check_config(cfg)
    assert status == 1, err
    found = problems(err)
    assert found[0] == (
        f"listen[0]: socket: the directory {tmp_path / 'nowhere'} does not exist (create it, "
        "or use RuntimeDirectory=qmpwatch under systemd)"
    )
    assert found[1] == "listen[1]: group: no such group: no-such-group-qw"
    assert found[2].startswith("libvirt[0]: uri: qemu+unix:///system?socket=")
    assert "cannot connect read-only" in found[2]
    assert len(found) == 3
    ok = write_config(
        tmp_path / "ok.toml",
        state_dir=tmp_path / "state",
        arrays={"listen": [{"socket": str(good / "qmp.sock"), "group": "root"}]},
    )
    status, out, err = await check_config(ok)
    assert status == 0, err
    assert out.splitlines()[-1] == (
        f"{ok}: probe OK (0 [[vm]] socket(s), [[listen]] {good / 'qmp.sock'}, state_dir)"
    )


@pytest.mark.libvirt
async def test_probe_lists_the_libvirt_domains_it_would_watch(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """A real libvirtd: the probe connects read-only and names the URI with the number of
    domains its globs match (one of two running domains)."""
    run = f"{LAB_PREFIX}{secrets.token_hex(3)}-"
    doms = [await LabDomain(libvirt_lab, DomainSpec(f"{run}{n}")).create() for n in ("a", "b")]
    try:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            arrays={"libvirt": [{"uri": URI, "domains": [f"{run}a"]}]},
        )
        status, out, err = await check_config(cfg)
    finally:
        for dom in doms:
            await virsh("destroy", dom.name)
    assert status == 0, err
    assert out.splitlines()[-1] == (
        f"{cfg}: probe OK (0 [[vm]] socket(s), [[libvirt]] {URI}: 1 domain(s), state_dir)"
    )
