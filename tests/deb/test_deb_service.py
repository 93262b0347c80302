"""The Debian package under a real systemd 252: install, upgrade, remove, purge (issue 26).

One systemd is booted for the module (tests/support/systemd_harness.py: PID 1 of a throwaway
namespace on an overlay of /, torn down on every path), with QEMU web01 running as its own unit
as the README's recipe says, and the packages the session built bound on /mnt/deb and
/mnt/deb-upgrade. The README's package steps run as written (`make deb` is the session's build
on the host: the namespace has no network). Each test brings the package to the state it starts
from (`PackageHost.ensure_*`), so any one of them runs alone. This machine's
/usr/sbin/policy-rc.d (a container image's, which forbids starting services) is removed from
the namespace's overlay: a Debian host has none."""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpwatch.lab import halt_firmware
from tests.support import systemd_harness
from tests.support.debs import Packages
from tests.support.service_host import CONFIG, LAB, UNIT, ServiceHost, config_text
from tests.support.systemd_harness import Journal, SystemdNamespace, SystemdUnavailable, wait_until

MAX_EXPOSURE = 1.5  # systemd-analyze security of the unit the package installs
DEB_DIR = "/mnt/deb"
UPGRADE_DIR = "/mnt/deb-upgrade"
VENV = "/opt/qmpwatch/venv"
STATE = "/var/lib/qmpwatch"
DEFAULTS = "/etc/default/qmpwatch"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
EDITED = config_text() + "# edited by the administrator\n"  # web01, fast reconnects


def readme_package_steps() -> list[str]:
    """The command lines of the README's package block (the first under "Run it on your
    hosts", the one that runs `apt install`)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Run it on your hosts") :]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        steps = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
        steps = [s for s in steps if s and not s.startswith("#")]
        if any(s.startswith("apt install") for s in steps):
            return steps
    raise AssertionError("README: no sh block with `apt install` under 'Run it on your hosts'")


class PackageHost:
    """The namespace as a host that installs qmpwatch from its package."""

    def __init__(self, service: ServiceHost, debs: Packages, upgrade: Packages) -> None:
        self.service = service
        self.ns = service.ns
        self.journal = service.journal
        self.debs = debs
        self.upgrade = upgrade
        self.readme_steps: list[tuple[str, subprocess.CompletedProcess[str]]] = []

    def sh(self, line: str, cwd: str = "/", check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ns.run("sh", "-c", f"cd {cwd} && {line}", env=APT_ENV, check=check)

    def status(self) -> tuple[str, str]:
        """dpkg's status of qmpwatch ("ii", "rc", or "" when unknown) and its version."""
        out = self.ns.run(
            "dpkg-query", "-W", "-f=${db:Status-Abbrev}|${Version}", "qmpwatch", check=False
        ).stdout
        abbrev, _, version = out.partition("|")
        return abbrev.strip(), version

    def install(self, packages: Packages, directory: str) -> subprocess.CompletedProcess[str]:
        """`apt-get install` of the package, older versions included (a test's start state)."""
        return self.sh(
            f"apt-get install -y --allow-downgrades ./{packages.main.name}", cwd=directory
        )

    def ensure_installed(self, config: str = EDITED) -> None:
        """The package installed (any version), the service running `config` with web01
        connected."""
        if self.status()[0] != "ii":
            self.install(self.debs, DEB_DIR)
        if self.service.config != config or self.ns.path(CONFIG).read_text() != config:
            mark = self.service.restart(config)
            self.journal.wait("vm_connected", after=mark, vm="web01")
        self.service.wait_ready()

    def ensure_version(self, packages: Packages, directory: str) -> None:
        if self.status() != ("ii", packages.version):
            self.install(packages, directory)
        self.ensure_installed()


@pytest.fixture(scope="module")
def pkg(
    tmp_path_factory: pytest.TempPathFactory, debs: Packages, upgrade_debs: Packages
) -> Iterator[PackageHost]:
    """A booted systemd, QEMU web01 as a unit, then the README's package steps, as written."""
    missing = systemd_harness.requirements()
    if missing:
        pytest.fail(
            "cannot boot a real systemd for the package tests; missing: " + "; ".join(missing),
            pytrace=False,
        )
    work = tmp_path_factory.mktemp("deb-systemd")
    lab = work / "lab"
    lab.mkdir()
    halt_firmware(lab / "halt.bin")
    binds = {debs.directory: DEB_DIR, upgrade_debs.directory: UPGRADE_DIR, lab: LAB}
    journal: Journal | None = None
    try:
        with systemd_harness.booted(work / "ns", binds) as ns:
            journal = Journal(ns)
            yield prepared(ns, journal, debs, upgrade_debs)
    except SystemdUnavailable as err:
        pytest.fail(f"cannot boot a real systemd for the package tests: {err}", pytrace=False)
    finally:
        if journal is not None:  # after the namespace: its journalctl ends with it
            journal.close()


def prepared(
    ns: SystemdNamespace, journal: Journal, debs: Packages, upgrade_debs: Packages
) -> PackageHost:
    """The host as its administrator finds it (a kvm group, QEMU web01 as a unit, no
    policy-rc.d), then the README's package steps, as written."""
    ns.run("rm", "-f", "/usr/sbin/policy-rc.d")
    if ns.run("getent", "group", "kvm", check=False).returncode != 0:
        ns.run("groupadd", "--system", "kvm")
    service = ServiceHost(ns, journal)
    service.start_qemu("web01")
    host = PackageHost(service, debs, upgrade_debs)
    for step in readme_package_steps():
        if step.startswith("make deb"):  # the session's build, on the host
            continue
        if step.split()[0] == "editor":  # the administrator edits the configuration
            service.write_config(EDITED)
            continue
        host.readme_steps.append((step, host.sh(step, cwd=DEB_DIR, check=False)))
    return host


def test_readme_package_steps_install_start_and_watch_the_vm(pkg: PackageHost) -> None:
    """The README's steps as written: `apt install ./qmpwatch_*.deb` installs offline and the
    package itself enables and starts the service, whose shipped config already watches web01;
    the probe and the reload of the edited config succeed."""
    steps = [step for step, _ in pkg.readme_steps]
    assert steps[0] == "apt install ./qmpwatch_*.deb"
    for step, result in pkg.readme_steps:
        assert result.returncode == 0, (step, result.stdout, result.stderr)
    assert "probe OK" in next(r for s, r in pkg.readme_steps if "--probe" in s).stdout
    started = pkg.journal.wait("daemon_started", after=0)
    assert started["version"] == pkg.debs.version
    assert started["config"] == CONFIG
    connected = pkg.journal.wait("vm_connected", after=0, vm="web01")
    assert connected["pid"] == pkg.service.qemu_pid()
    assert pkg.journal.wait("config_reloaded", after=0)
    assert pkg.ns.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    props = pkg.service.wait_ready()
    assert props["ActiveState"] == "active"


def test_the_package_installs_the_user_config_state_unit_and_command(pkg: PackageHost) -> None:
    """The qmpwatch system user in kvm (/etc/default/qmpwatch), /etc/qmpwatch/config.toml
    readable by root and the service only, /var/lib/qmpwatch the service's, the unit systemd
    loaded from /lib/systemd/system running the venv, /usr/bin/qmpwatch, its man page and the
    README."""
    pkg.ensure_installed()
    ns = pkg.ns
    passwd = ns.run("getent", "passwd", "qmpwatch").stdout.strip().split(":")
    assert int(passwd[2]) < 1000  # a system user
    assert passwd[6] == "/usr/sbin/nologin"
    assert "kvm" in ns.run("id", "-nG", "qmpwatch").stdout.split()
    assert 'QMPWATCH_GROUPS="kvm"' in ns.path(DEFAULTS).read_text()
    qmpwatch_gid = int(passwd[3])
    for path, mode, uid, gid in (
        ("/etc/qmpwatch", 0o750, 0, qmpwatch_gid),
        (CONFIG, 0o640, 0, qmpwatch_gid),
        (STATE, 0o750, int(passwd[2]), qmpwatch_gid),
    ):
        st = ns.path(path).stat()
        assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid) == (oct(mode), uid, gid), path
    props = pkg.service.show("FragmentPath", "ExecStart", "User")
    assert props["FragmentPath"] == "/lib/systemd/system/qmpwatch.service"
    assert f"path={VENV}/bin/qmpwatch" in props["ExecStart"]
    assert props["User"] == "qmpwatch"
    assert ns.run("qmpwatch", "--version").stdout.strip() == f"qmpwatch {pkg.status()[1]}"
    assert ns.run("man", "-w", "qmpwatch").stdout.strip() == "/usr/share/man/man1/qmpwatch.1.gz"
    assert ns.path("/usr/share/doc/qmpwatch/README.md.gz").is_file()


def test_systemd_analyze_security_of_the_installed_unit(pkg: PackageHost) -> None:
    """`systemd-analyze security qmpwatch.service` on the unit the package installed and
    systemd loaded: exposure <= 1.5."""
    pkg.ensure_installed()
    out = pkg.ns.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    found = re.search(r"Overall exposure level for qmpwatch\.service: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= MAX_EXPOSURE, out


def test_groups_from_etc_default_apply_on_dpkg_reconfigure(pkg: PackageHost) -> None:
    """QMPWATCH_GROUPS in /etc/default/qmpwatch: `dpkg-reconfigure qmpwatch` adds the user to
    each group that exists, names the one that does not, and restarts the service into them."""
    pkg.ensure_installed()
    ns = pkg.ns
    if ns.run("getent", "group", "libvirt-qemu", check=False).returncode != 0:
        ns.run("groupadd", "--system", "libvirt-qemu")
    gid = ns.run("getent", "group", "libvirt-qemu").stdout.split(":")[2]
    defaults = ns.path(DEFAULTS)
    original = defaults.read_text()
    try:
        defaults.write_text(
            original.replace('QMPWATCH_GROUPS="kvm"', 'QMPWATCH_GROUPS="kvm libvirt-qemu nosuch"')
        )
        pid = pkg.service.main_pid()
        mark = pkg.journal.mark()
        result = ns.run("dpkg-reconfigure", "qmpwatch", env=APT_ENV)
        assert "there is no group 'nosuch'" in result.stderr
        assert "libvirt-qemu" in ns.run("id", "-nG", "qmpwatch").stdout.split()
        pkg.journal.wait("daemon_started", after=mark)
        pkg.service.wait_ready()
        new_pid = pkg.service.main_pid()
        assert new_pid != pid
        groups = re.search(
            r"^Groups:\s*(.*)$", ns.path(f"/proc/{new_pid}/status").read_text(), re.M
        )
        assert groups, "no Groups: line"
        assert gid in groups.group(1).split()
    finally:
        defaults.write_text(original)


def test_qmpwatch_libvirt_adds_the_bindings_to_the_venv(pkg: PackageHost) -> None:
    """qmpwatch-libvirt: libvirt's bindings importable by the venv's Python, as the service's
    user; removing it takes them away and leaves qmpwatch running."""
    pkg.ensure_installed()
    pkg.sh(f"apt-get install -y ./{pkg.debs.libvirt.name}", cwd=DEB_DIR)
    probe = (
        "runuser",
        "-u",
        "qmpwatch",
        "--",
        f"{VENV}/bin/python",
        "-c",
        "import libvirt, libvirtaio",
    )
    assert pkg.ns.run(*probe, check=False).returncode == 0
    pkg.sh("apt-get remove -y qmpwatch-libvirt")
    assert pkg.ns.run(*probe, check=False).returncode != 0
    assert pkg.service.show("ActiveState")["ActiveState"] == "active"


def test_upgrade_keeps_the_edited_config_and_restarts_onto_the_new_code(pkg: PackageHost) -> None:
    """`apt install` of a higher version: the edited config is kept without a question, and the
    service is restarted by the package onto the new code (its daemon_started names the new
    version) and connects web01 again."""
    pkg.ensure_version(pkg.debs, DEB_DIR)
    pid = pkg.service.main_pid()
    mark = pkg.journal.mark()
    result = pkg.install(pkg.upgrade, UPGRADE_DIR)
    assert "conffile" not in result.stdout.lower()
    assert pkg.status() == ("ii", pkg.upgrade.version)
    assert pkg.ns.path(CONFIG).read_text() == EDITED
    config = pkg.ns.path(CONFIG).stat()
    assert oct(stat.S_IMODE(config.st_mode)) == oct(0o640)
    started = pkg.journal.wait("daemon_started", after=mark)
    assert started["version"] == pkg.upgrade.version
    pkg.journal.wait("vm_connected", after=mark, vm="web01")
    assert pkg.service.main_pid() != pid
    assert pkg.ns.run("qmpwatch", "--version").stdout.strip() == f"qmpwatch {pkg.upgrade.version}"


def test_apt_remove_stops_the_service_and_keeps_config_and_state(pkg: PackageHost) -> None:
    """`apt remove qmpwatch`: the service stopped and its unit gone, the venv and the command
    gone; the edited config, /etc/default/qmpwatch, the state and the user stay."""
    pkg.ensure_installed()
    ns = pkg.ns
    wait_until("the state database", ns.path(f"{STATE}/state.sqlite3").exists, 60.0)
    # the databases (their -wal and -shm files go when the daemon stops cleanly)
    state = {p.name for p in ns.path(STATE).glob("*.sqlite3")}
    assert "state.sqlite3" in state
    pid = pkg.service.main_pid()
    pkg.sh("apt-get remove -y qmpwatch")
    assert pkg.status()[0] == "rc"
    assert not ns.path(f"/proc/{pid}").exists()
    assert pkg.service.show("LoadState")["LoadState"] == "not-found"
    for gone in (VENV, "/usr/bin/qmpwatch", "/lib/systemd/system/qmpwatch.service"):
        assert not ns.path(gone).exists(), gone
    assert ns.path(CONFIG).read_text() == EDITED
    assert ns.path(DEFAULTS).is_file()
    assert {p.name for p in ns.path(STATE).glob("*.sqlite3")} == state
    assert ns.run("getent", "passwd", "qmpwatch", check=False).returncode == 0


def test_apt_purge_removes_config_and_state(pkg: PackageHost) -> None:
    """`apt purge qmpwatch` (after a remove, or at once): the config, /etc/default/qmpwatch,
    the state and the logs' directory are gone, and dpkg forgets the package."""
    if pkg.status()[0] not in ("ii", "rc"):
        pkg.ensure_installed()
    ns = pkg.ns
    assert ns.path(CONFIG).exists()
    pkg.sh("apt-get purge -y qmpwatch")
    assert pkg.status()[0] in ("", "un", "pn")
    for gone in ("/etc/qmpwatch", DEFAULTS, STATE, "/var/log/qmpwatch", "/opt/qmpwatch"):
        assert not ns.path(gone).exists(), gone
    pkg.service.config = ""  # installed again by the next test that needs it
