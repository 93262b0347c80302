"""qmpwatch installed and running as a service under a real systemd
(tests/support/systemd_harness.py).

`ServiceHost.set_up()` does what a host's administrator does, in the booted namespace: tries
`make install` on a host with no `kvm` group (kept in `install_without_group`), creates the
group, runs a QEMU as its own unit with group-writable sockets (the README's recipe), then runs
the README's install steps as written (`readme_steps`), with the configuration written where
the README says to edit it. The package comes from wheels built on the host (the namespace has
no network); the checkout is bound read-only on /mnt/src.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.systemd_harness import Journal, SystemdNamespace, qmp, unit_text, wait_until

ROOT = Path(__file__).resolve().parents[2]
SRC = "/mnt/src"
WHEELS = "/mnt/wheels"
LAB = "/mnt/lab"  # the halt firmware
CONFIG = "/etc/qmpwatch/config.toml"
UNIT = "qmpwatch.service"
INSTALL_ENV = {"QMPWATCH_WHEELS": WHEELS}
QEMU = "/usr/bin/qemu-system-x86_64"
# The README's recipe: QEMU as a unit, its sockets group-writable in a setgid directory of kvm.
QEMU_UNIT = unit_text(
    {
        "Unit": ["Description=QEMU %i (no guest: qmpwatch's tests)"],
        "Service": [
            "UMask=0007",
            "ExecStartPre=/usr/bin/install -d -m 2750 -g kvm /run/qemu",
            "ExecStartPre=/usr/bin/install -d -m 0700 /run/qemu-control",
            f"ExecStart={QEMU} -name %i -machine pc -accel tcg -bios {LAB}/halt.bin -nodefaults "
            "-display none -no-shutdown -qmp unix:/run/qemu/%i.qmp,server=on,wait=off "
            "-qmp unix:/run/qemu-control/%i.qmp,server=on,wait=off",
        ],
    }
)
#: A libvirt-qemu-like user: QEMU as a system user whose primary group is kvm (Debian's
#: libvirt-qemu is one), made in the namespace by `ServiceHost.start_vm`.
QEMU_USER = "qemuvm"
LISTEN_SOCKET = "/run/qmpwatch/listen/qmp.sock"  # the README's [[listen]] socket
DISCOVER_DIR = "/run/qemu-vm"  # where QEMU as QEMU_USER makes its sockets ([[discover]])
BASE_DAEMON: dict[str, object] = {"metrics_listen": "127.0.0.1:9752"}
FAST_CONNECT = {"timeout_s": 2.0, "backoff_initial_s": 0.1, "backoff_max_s": 0.5}


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def config_text(
    *,
    daemon: Mapping[str, object] | None = None,
    vms: Sequence[str] = ("web01",),
    webhook: str = "",
) -> str:
    """A configuration for the namespace: the VMs by name (socket /run/qemu/NAME.qmp)."""
    lines = ["[daemon]"]
    lines += [f"{k} = {toml(v)}" for k, v in {**BASE_DAEMON, **(daemon or {})}.items()]
    lines.append("[connect]")
    lines += [f"{k} = {toml(v)}" for k, v in FAST_CONNECT.items()]
    for name in vms:
        lines += ["[[vm]]", f"name = {toml(name)}", f'socket = "/run/qemu/{name}.qmp"']
        lines.append('no_shutdown = "auto"')
    if webhook:
        lines += ["[[alert.webhook]]", f"url = {toml(webhook)}", "timeout_s = 1.0"]
    return "\n".join(lines) + "\n"


BASE_CONFIG = config_text()


def readme_install_steps() -> list[str]:
    """The command lines of the README's install block (under "Run it on your hosts")."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run it on your hosts") :]
    # the block of `make install` (the Debian package's comes first)
    block = re.search(r"```sh\n(make install.*?)```", section, re.S)
    assert block, "README: no sh block of make install under 'Run it on your hosts'"
    steps = []
    for raw in block.group(1).splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            steps.append(line)
    return steps


class ServiceHost:
    """The namespace with qmpwatch installed, QEMU `web01` running, the service started."""

    def __init__(self, ns: SystemdNamespace, journal: Journal) -> None:
        self.ns = ns
        self.journal = journal
        self.install_without_group: subprocess.CompletedProcess[str] | None = None
        self.readme_steps: list[tuple[str, subprocess.CompletedProcess[str]]] = []
        self.config = ""
        self.installed = False  # by the README's steps in set_up(); again by ensure()
        self.controls: dict[str, Path] = {}  # the VMs of start_vm: their control sockets

    def sh(self, line: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A shell line inside, in the checkout, with the install's offline wheels."""
        return self.ns.run("sh", "-c", f"cd {SRC} && {line}", env=INSTALL_ENV, check=check)

    def set_up(self) -> None:
        # A host with udev has a `kvm` group already: this host is one without (the overlay's
        # /etc/group, not the machine's), on which make install must say which group to use.
        if self.ns.run("getent", "group", "kvm", check=False).returncode == 0:
            self.ns.run("groupdel", "kvm")
        self.install_without_group = self.sh("make install", check=False)
        self.ns.run("groupadd", "--system", "--force", "kvm")  # udev may have made it already
        self.start_qemu("web01")
        for step in readme_install_steps():
            if step.split()[0] == "editor":  # the administrator edits the configuration
                self.write_config(BASE_CONFIG)
                continue
            self.readme_steps.append((step, self.sh(step)))
        self.installed = True
        self.wait_ready()

    # -- QEMU ---------------------------------------------------------------------------------

    def start_qemu(self, name: str, umask: str = "") -> None:
        """Start the unit qemu@NAME (with `umask`, a drop-in in place of the recipe's 0007)
        and wait for its monitor socket."""
        template = self.ns.path("/etc/systemd/system/qemu@.service")
        if not template.exists():
            template.write_text(QEMU_UNIT)
        if umask:
            dropin = self.ns.path(f"/run/systemd/system/qemu@{name}.service.d")
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "umask.conf").write_text(f"[Service]\nUMask={umask}\n")
        self.ns.run("systemctl", "daemon-reload")
        self.ns.run("systemctl", "start", f"qemu@{name}.service")
        sockets = [self.ns.path(f"/run/qemu/{name}.qmp"), self.control(name)]
        wait_until(f"QEMU {name}'s sockets", lambda: all(s.exists() for s in sockets), 60.0)

    def add_user(self, user: str) -> None:
        """A system user in group kvm for QEMU to run as (once; as a libvirt-qemu user)."""
        if self.ns.run("getent", "passwd", user, check=False).returncode != 0:
            self.ns.run("useradd", "--system", "--gid", "kvm", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", user)  # fmt: skip

    def start_vm(self, name: str, monitor: str, user: str = "") -> None:
        """QEMU `name` as the unit vm-NAME.service, as `user` (root if empty), with the QEMU
        options `monitor` for qmpwatch and a second monitor for the tests (`control`)."""
        if user:
            self.add_user(user)
        unit = unit_text(
            {
                "Unit": [f"Description=QEMU {name} as {user or 'root'} (qmpwatch's tests)"],
                "Service": [
                    *([f"User={user}", "Group=kvm"] if user else []),
                    "UMask=0007",
                    f"ExecStartPre=+/usr/bin/install -d -m 2770 -g kvm {DISCOVER_DIR}",
                    "ExecStartPre=+/usr/bin/install -d -m 0711 /run/qemu-ctl",
                    f"ExecStartPre=+/usr/bin/install -d -m 0700 -o {user or 'root'} "
                    f"/run/qemu-ctl/{name}",
                    f"ExecStart={QEMU} -name {name} -machine pc -accel tcg -bios {LAB}/halt.bin "
                    f"-nodefaults -display none -no-shutdown {monitor} "
                    f"-qmp unix:/run/qemu-ctl/{name}/c.qmp,server=on,wait=off",
                ],
            }
        )
        self.ns.path(f"/run/systemd/system/vm-{name}.service").write_text(unit)
        self.ns.run("systemctl", "daemon-reload")
        self.ns.run("systemctl", "start", f"vm-{name}.service")
        self.controls[name] = control = self.ns.path(f"/run/qemu-ctl/{name}/c.qmp")

        def up() -> bool:
            state = self.ns.show(f"vm-{name}.service", "ActiveState")["ActiveState"]
            if state == "failed":
                log = self.ns.run("journalctl", "--no-pager", "-u", f"vm-{name}.service")
                raise AssertionError(f"vm-{name}.service failed: {log.stdout[-2000:]}")
            return control.exists()

        wait_until(f"QEMU {name}'s control socket", up, 60.0)

    def stop_vm(self, name: str) -> None:
        """Stop (or forget the failed) vm-NAME.service and remove its unit."""
        self.ns.run("systemctl", "stop", f"vm-{name}.service", check=False)
        self.ns.run("systemctl", "reset-failed", f"vm-{name}.service", check=False)
        self.ns.path(f"/run/systemd/system/vm-{name}.service").unlink(missing_ok=True)
        self.controls.pop(name, None)
        self.ns.run("systemctl", "daemon-reload")

    def control(self, name: str = "web01") -> Path:
        """QEMU's second monitor (for the tests; qmpwatch has the first)."""
        if name in self.controls:
            return self.controls[name]
        return self.ns.path(f"/run/qemu-control/{name}.qmp")

    def qmp(self, command: str, vm: str = "web01", **arguments: Any) -> Any:
        return qmp(self.control(vm), command, **arguments)

    def qemu_pid(self, name: str = "web01") -> int:
        unit = f"vm-{name}.service" if name in self.controls else f"qemu@{name}.service"
        return int(self.ns.show(unit, "MainPID")["MainPID"])

    # -- the service --------------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        self.ns.path(CONFIG).write_text(text)
        self.config = text

    def show(self, *properties: str) -> dict[str, str]:
        return self.ns.show(UNIT, *properties)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def wait_ready(self, timeout: float = 120.0) -> dict[str, str]:
        """Until the service is active (running): Type=notify, so READY=1 has come."""

        def ready() -> dict[str, str] | None:
            p = self.show("ActiveState", "SubState", "MainPID", "StatusText")
            return p if (p["ActiveState"], p["SubState"]) == ("active", "running") else None

        found: dict[str, str] = wait_until(
            "qmpwatch.service active (running)", ready, timeout, interval=0.1
        )
        return found

    def restart(self, config: str | None = None) -> int:
        """(Write `config` and) restart the service; waits for its `daemon_started` and READY.
        Returns the journal mark from before the restart."""
        if config is not None:
            self.write_config(config)
        mark = self.journal.mark()
        self.ns.run("systemctl", "reset-failed", UNIT)  # restarts count against StartLimitBurst
        self.ns.run("systemctl", "restart", UNIT)
        self.journal.wait("daemon_started", after=mark)
        self.wait_ready()
        return mark

    def reload(self, config: str) -> int:
        """Write `config` and `systemctl reload`; returns the journal mark from before. The
        reload returns at once (ExecReload= sends SIGHUP): wait for the record."""
        self.write_config(config)
        mark = self.journal.mark()
        self.ns.run("systemctl", "reload", UNIT)
        return mark

    def ensure(self, config: str = BASE_CONFIG) -> None:
        """The service running `config` with web01 connected (after a test that changed them,
        or uninstalled it)."""
        if not self.installed:
            self.sh("make install")
            self.ns.run("systemctl", "enable", UNIT)
            self.installed = True
        if self.config != config or self.show("ActiveState")["ActiveState"] != "active":
            mark = self.restart(config)
            self.journal.wait("vm_connected", after=mark, vm="web01")
