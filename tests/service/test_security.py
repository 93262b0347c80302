"""Security: qmpwatch talks only to the sockets it was given or found, keeps secrets out of
its logs, and listens only on loopback unless told otherwise.

Every socket qmpwatch must not touch is a fake monitor that counts its clients: the ground
truth for "never connected" is that count, not the daemon's own word.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpwatch.core.config import DaemonConfig, load_config
from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, write_config
from tests.support.fake_qmp import FakeQmp

FAST = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def fakes(*paths: Path) -> AsyncIterator[dict[str, FakeQmp]]:
    """A fake monitor on each path, by file stem."""
    async with contextlib.AsyncExitStack() as stack:
        served = {}
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            served[path.stem] = await stack.enter_async_context(FakeQmp.serve(path))
        yield served


async def test_connects_only_to_configured_and_discovered_sockets(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Files that are not sockets, names outside the glob, links out of its directory: untouched."""
    run, out = sock_dir / "run", sock_dir / "out"
    async with fakes(
        sock_dir / "conf" / "conf.qmp",  # configured
        run / "disc.qmp",  # discovered
        run / "other.sock",  # in the directory, but the glob does not match it
        out / "abs.qmp",  # behind an absolute symlink out of the directory
        out / "rel.qmp",  # behind a relative one
        out / "chain.qmp",  # behind a symlink to a symlink inside that points out
        sock_dir / "stray.qmp",  # nobody points at it
    ) as served:
        (run / "file.qmp").write_text("not a socket\n")
        os.mkfifo(run / "fifo.qmp")
        (run / "dir.qmp").mkdir()
        (run / "abs.qmp").symlink_to(out / "abs.qmp")
        (run / "rel.qmp").symlink_to(Path("..") / "out" / "rel.qmp")
        (run / "hop").symlink_to(out / "chain.qmp")
        (run / "chain.qmp").symlink_to(run / "hop")
        (run / "dangling.qmp").symlink_to(run / "nothing-here")
        (run / "alias.qmp").symlink_to("disc.qmp")  # stays inside: allowed
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "conf", "socket": str(sock_dir / "conf" / "conf.qmp")}],
            discover=[{"glob": str(run / "*.qmp")}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            for name in ("conf", "disc", "alias"):
                await daemon.wait_for("vm_connected", vm=name)
            # A socket created now is found by a later scan, which saw everything above too.
            async with fakes(run / "late.qmp") as late:
                await daemon.wait_for("vm_connected", vm="late")
                assert late["late"].connections == 1
            added = {r["vm"] for r in daemon.find("vm_added")}
            assert added == {"conf", "disc", "alias", "late"}
            for name in ("other", "abs", "rel", "chain", "stray"):
                assert served[name].connections == 0, name
            assert served["conf"].connections == 1
            assert served["disc"].connections == 2  # disc.qmp and alias.qmp
            assert await daemon.stop() == 0


async def test_a_directory_symlink_matched_by_the_glob_is_not_followed_out(
    tmp_path: Path, sock_dir: Path
) -> None:
    """glob run/*/*.qmp: a run/evil -> elsewhere directory link does not lead qmpwatch out."""
    run, out = sock_dir / "run", sock_dir / "out"
    async with fakes(run / "vm1" / "vm1.qmp", out / "evil.qmp") as served:
        (run / "evil").symlink_to(out, target_is_directory=True)
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            discover=[{"glob": str(run / "*" / "*.qmp")}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="vm1")
            async with fakes(run / "vm1" / "late.qmp"):
                await daemon.wait_for("vm_connected", vm="late")
            assert {r["vm"] for r in daemon.find("vm_added")} == {"vm1", "late"}
            assert served["evil"].connections == 0
            assert await daemon.stop() == 0


async def test_a_discovered_link_retargeted_out_of_the_directory_is_not_followed(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A link found pointing inside, then swapped to point out: reconnects never follow it."""
    run, out = sock_dir / "run", sock_dir / "out"
    async with fakes(run / "inner.sock", out / "evil.sock") as served:
        link = run / "swap.qmp"
        link.symlink_to(run / "inner.sock")
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            discover=[{"glob": str(run / "*.qmp")}],
            sections={"connect": FAST},
        )
        async with DaemonProcess.start(cfg) as daemon:
            await daemon.wait_for("vm_connected", vm="swap")
            session = await served["inner"].session(1)
            mark = daemon.mark()
            tmp_link = run / "swap.tmp"
            tmp_link.symlink_to(out / "evil.sock")
            tmp_link.replace(link)  # atomically: swap.qmp -> out/evil.sock
            session.close()  # the session ends; the daemon attaches again after its backoff
            await daemon.wait_for("vm_removed", vm="swap", after=mark)
            refused = daemon.find("vm_connect_failed", vm="swap", after=mark)
            assert [r["reason"] for r in refused] in ([], ["outside_dir"])
            assert served["evil"].connections == 0
            assert not daemon.find("vm_connected", vm="swap", after=mark)
            assert await daemon.stop() == 0


@pytest.mark.qemu
async def test_secrets_never_reach_the_logs(tmp_path: Path, sock_dir: Path) -> None:
    """Header, HMAC and exec secrets (env:, file:): never in stdout or stderr, whatever happens."""
    token = "tok-" + secrets.token_hex(16)
    hmac_key = "hmac-" + secrets.token_hex(16)
    am_token = "am-" + secrets.token_hex(16)
    exec_secret = "exec-" + secrets.token_hex(16)
    secret_file = tmp_path / "hmac.key"
    secret_file.write_text(hmac_key + "\n")
    env = {"QW_TEST_TOKEN": token, "QW_TEST_AM": am_token, "QW_TEST_EXEC": exec_secret}
    async with LabVM.start(LabSpec(name="vm1"), sock_dir) as vm:
        cfg = write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            vms=[{"name": "vm1", "socket": str(vm.watch_socket)}],
            sections={"connect": FAST, "alert": {"retry_initial_s": 0.05, "retry_max_s": 0.1}},
            arrays={
                "alert.webhook": [
                    {
                        "url": "http://127.0.0.1:9/hook",  # discard port: nothing listens
                        "headers": {"Authorization": "env:QW_TEST_TOKEN"},
                        "hmac_secret": f"file:{secret_file}",
                        "timeout_s": 0.5,
                    }
                ],
                "alert.alertmanager": [
                    {
                        "url": "http://127.0.0.1:9",
                        "headers": {"Authorization": "env:QW_TEST_AM"},
                        "timeout_s": 0.5,
                    }
                ],
                "alert.exec": [
                    {
                        "command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                        "env": {"PAGER_TOKEN": "env:QW_TEST_EXEC"},
                    }
                ],
            },
        )
        async with DaemonProcess.start(cfg, env=env) as daemon:
            await daemon.wait_for("vm_connected", vm="vm1")
            mark = daemon.mark()
            await vm.stop()  # an alert: every sink tries, fails, and says so
            await daemon.wait_for("alert", vm="vm1", after=mark)
            for sink in ("webhook", "alertmanager", "exec"):
                await daemon.wait_for("alert_delivery_failed", sink=f"{sink}[0]")
            # an invalid reload names the key, not the value
            cfg.write_text(cfg.read_text().replace("env:QW_TEST_TOKEN", "env:QW_TEST_MISSING"))
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("config_reload_refused", after=mark)
            await daemon.stop()
        output = "\n".join(map(str, daemon.records)) + "\n".join(daemon.bad_lines)
        output += daemon.stderr.decode("utf-8", "replace")
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpwatch", "check-config", "-c", str(cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
        )  # fmt: skip
        checked = (await check.communicate())[0].decode()
        assert "QW_TEST_MISSING" in checked
        output += checked
    for secret in (token, hmac_key, am_token, exec_secret):
        assert secret not in output


def test_http_endpoint_defaults_to_loopback(tmp_path: Path) -> None:
    """metrics_listen is loopback by default: in the dataclass, a config without it, the example."""
    assert DaemonConfig().metrics_listen.startswith("127.0.0.1:")
    minimal = tmp_path / "minimal.toml"
    minimal.write_text('[[vm]]\nname = "a"\nsocket = "/run/qemu/a.qmp"\n')
    assert load_config(minimal).daemon.metrics_listen.startswith("127.0.0.1:")
    example = load_config(REPO / "config.example.toml")
    assert example.daemon.metrics_listen.split(":")[0] in ("127.0.0.1", "[::1]", "")


async def test_metrics_endpoint_binds_only_the_address_it_is_given(tmp_path: Path) -> None:
    """metrics_listen on 127.0.0.1: the daemon's only listening TCP socket is on loopback."""
    with socket.socket() as probe:  # a free port, for the moment
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        sections={"daemon": {"metrics_listen": f"127.0.0.1:{port}"}},
    )
    async with DaemonProcess.start(cfg) as daemon:
        listening = await daemon.wait_for("metrics_listening")
        assert listening_addresses(daemon.proc.pid) == {("0100007F", listening["port"])}
        assert await daemon.stop() == 0


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(hex address, port) of the TCP sockets `pid` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}", encoding="ascii") as rows:
            for row in list(rows)[1:]:
                cols = row.split()
                address, port = cols[1].split(":")
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.add((address, int(port, 16)))
    return found
