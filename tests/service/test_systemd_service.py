"""The service for real: `make install` and the unit under a real systemd 252 (issue 15).

One systemd is booted for the module (tests/support/systemd_harness.py: PID 1 of a throwaway
namespace on an overlay of /, torn down on every path), qmpwatch installed in it as the README
says and started as `qmpwatch.service`, watching a QEMU that runs as its own unit. Each test
leaves the service running the base configuration, as it found it (`ServiceHost.ensure`). Where
this cannot run (not root, no unshare, ...) the tests fail saying what is missing; they never
skip."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterator

import pytest

from qmpwatch.lab import halt_firmware
from qmpwatch.output.journal import message_id
from qmpwatch.service.sdnotify import status_line
from tests.support import systemd_harness
from tests.support.service_host import (
    BASE_CONFIG,
    CONFIG,
    DISCOVER_DIR,
    LAB,
    LISTEN_SOCKET,
    QEMU_USER,
    ROOT,
    SRC,
    UNIT,
    WHEELS,
    ServiceHost,
    config_text,
)
from tests.support.systemd_harness import Journal, SystemdNamespace, SystemdUnavailable, wait_until

MAX_EXPOSURE = 1.5  # systemd-analyze security of the installed unit, as loaded by systemd
STOP_QUICK_S = 10.0  # `systemctl stop` took 0.08 s when measured; the daemon's own deadline is 5 s
VENV = "/opt/qmpwatch/venv"
UNIT_PATH = "/usr/local/lib/systemd/system/qmpwatch.service"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHost]:
    """A booted systemd with qmpwatch installed and running, QEMU web01 as a unit."""
    missing = systemd_harness.requirements()
    if missing:
        pytest.fail(
            "cannot boot a real systemd for the service tests; missing: " + "; ".join(missing),
            pytrace=False,
        )
    wheels = systemd_harness.wheels_for(ROOT).wait()
    work = tmp_path_factory.mktemp("systemd")
    lab = work / "lab"
    lab.mkdir()
    halt_firmware(lab / "halt.bin")
    ns = SystemdNamespace(work / "ns", {ROOT: SRC, wheels: WHEELS, lab: LAB})
    journal: Journal | None = None
    try:
        try:
            ns.boot()
        except SystemdUnavailable as err:
            pytest.fail(f"cannot boot a real systemd for the service tests: {err}", pytrace=False)
        journal = Journal(ns)
        service = ServiceHost(ns, journal)
        service.set_up()
        yield service
    finally:
        ns.close()  # first: the journal's reader ends with the namespace
        if journal is not None:
            journal.close()


@pytest.fixture
def svc(host: ServiceHost) -> ServiceHost:
    """The module's service, running the base configuration with web01 connected."""
    host.ensure()
    return host


# -- make install ---------------------------------------------------------------------------------


def test_readme_install_steps_run_as_written(host: ServiceHost) -> None:
    """The README's install block ran line by line (as root, in the checkout): make install,
    the probe as the service's user, enable --now."""
    steps = [step for step, _ in host.readme_steps]
    assert steps[0] == "make install"
    assert any("check-config --probe" in step for step in steps)
    assert steps[-1] == "systemctl enable --now qmpwatch"
    for step, result in host.readme_steps:
        assert result.returncode == 0, (step, result.stdout, result.stderr)
    probe = next(r for s, r in host.readme_steps if "--probe" in s)
    assert "probe OK" in probe.stdout
    assert host.ns.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"


def test_make_install_without_a_kvm_group_says_which_group_to_use(host: ServiceHost) -> None:
    """On a host with no kvm group, make install stops before changing anything and says
    which group to name or how to create it."""
    result = host.install_without_group
    assert result is not None
    assert result.returncode != 0
    assert "there is no group 'kvm'" in result.stderr
    assert "QMPWATCH_GROUP=" in result.stderr
    assert "groupadd --system kvm" in result.stderr


def test_make_install_puts_everything_where_the_unit_and_readme_say(svc: ServiceHost) -> None:
    """The user (in kvm), the venv that ExecStart= runs, the link, the config readable by the
    service only, the unit with the group; ExecStart= in the loaded unit is the venv's."""
    ns = svc.ns
    assert "kvm" in ns.run("id", "-nG", "qmpwatch").stdout.split()
    exec_start = svc.show("ExecStart")["ExecStart"]
    assert f"path={VENV}/bin/qmpwatch" in exec_start, exec_start
    assert os.readlink(ns.path("/usr/local/bin/qmpwatch")) == f"{VENV}/bin/qmpwatch"
    config = ns.path("/etc/qmpwatch/config.toml").stat()
    assert stat.S_IMODE(config.st_mode) == 0o640
    unit = ns.path(UNIT_PATH).read_text()
    assert "SupplementaryGroups=kvm systemd-journal\n" in unit
    assert svc.show("FragmentPath")["FragmentPath"] == UNIT_PATH


def test_make_install_twice_changes_nothing_and_keeps_the_config(svc: ServiceHost) -> None:
    """A second make install keeps the edited config, leaves the unit and the running service
    alone, and says so step by step."""
    unit_before = svc.ns.path(UNIT_PATH).read_bytes()
    pid = svc.main_pid()
    result = svc.sh("make install")
    out = result.stdout
    assert "user qmpwatch: exists" in out
    assert f"{CONFIG}: kept" in out
    assert f"{UNIT_PATH}: unchanged" in out
    assert "daemon-reload" not in out
    assert svc.ns.path(CONFIG).read_text() == BASE_CONFIG
    assert svc.ns.path(UNIT_PATH).read_bytes() == unit_before
    assert svc.main_pid() == pid


# -- the running service --------------------------------------------------------------------------


def test_active_running_ready_with_a_status_line(svc: ServiceHost) -> None:
    """active (running) means READY=1 came (Type=notify); STATUS= counts VMs and alerts."""
    wanted = status_line(1, 1, 0)

    def status_is_wanted() -> dict[str, str] | None:
        props = svc.show("StatusText", "ActiveState", "SubState", "Type")
        return props if props["StatusText"] == wanted else None

    props = wait_until(f"STATUS={wanted}", status_is_wanted, 30.0, interval=0.1)
    assert (props["ActiveState"], props["SubState"], props["Type"]) == (
        "active",
        "running",
        "notify",
    )
    status = svc.ns.run("systemctl", "status", "--no-pager", "--lines=0", UNIT).stdout
    assert "active (running)" in status
    assert f'Status: "{wanted}"' in status


def test_vm_connected_reads_no_shutdown_from_qemus_command_line(svc: ServiceHost) -> None:
    """vm_connected: no_shutdown true, read from /proc/PID/cmdline under ProcSubset=pid, and
    the PID is the QEMU unit's."""
    mark = svc.restart()
    connected = svc.journal.wait("vm_connected", after=mark, vm="web01")
    assert connected["no_shutdown"] is True
    assert connected["pid"] == svc.qemu_pid()
    assert connected["status"] == "running"
    assert not svc.journal.find("qemu_cmdline_unreadable", after=mark)


def test_a_stop_through_a_second_monitor_alerts_and_cont_resolves(svc: ServiceHost) -> None:
    """`stop` on QEMU's other monitor: the alert record in the journal and STATUS= says so;
    `cont`: alert_resolved, whose resolved_summary reads as resolved."""
    mark = svc.journal.mark()
    svc.qmp("stop")
    alert = svc.journal.wait("alert", after=mark, vm="web01", alert="vm_stopped_unexpected")
    assert alert["severity"] == "warning"  # a client's stop: client_stop_severity
    wait_until(
        "STATUS= with the alert",
        lambda: svc.show("StatusText")["StatusText"] == status_line(1, 1, 1),
        30.0,
        interval=0.1,
    )
    svc.qmp("cont")
    resolved = svc.journal.wait("alert_resolved", after=mark, fingerprint=alert["fingerprint"])
    assert resolved["summary"] == alert["summary"]
    assert resolved["resolved_summary"].startswith(f"Resolved: {alert['summary']}; ended: ")
    assert resolved["reason"] in resolved["resolved_summary"]


def test_a_qemu_unit_killed_is_named_by_its_unit_result(svc: ServiceHost) -> None:
    """kill -9 of the QEMU that runs as qemu@web01: vm_crashed names the unit's Result= and
    signal, as the unprivileged service reads them (systemctl over D-Bus, as on any host)."""
    svc.ns.run("systemctl", "start", "dbus.socket")
    mark = svc.journal.mark()
    svc.ns.run("kill", "-KILL", str(svc.qemu_pid()))
    alert = svc.journal.wait("alert", after=mark, vm="web01", alert="vm_crashed")
    details = alert["details"]
    assert details["crash_cause"] == "signal", alert
    assert details["crash_cause_source"] == "unit"
    assert (details["unit"], details["unit_result"], details["signal"]) == (
        "qemu@web01.service",
        "signal",
        9,
    )
    assert alert["summary"].endswith("killed by signal 9 (KILL) (systemd unit qemu@web01.service)")
    svc.ns.run("systemctl", "reset-failed", "qemu@web01.service")
    mark = svc.journal.mark()
    svc.start_qemu("web01")
    svc.journal.wait("alert_resolved", after=mark, vm="web01", alert="vm_crashed")


def test_reload_applies_a_changed_config_and_refuses_an_invalid_one(svc: ServiceHost) -> None:
    """systemctl reload: a new VM is added (config_reloaded); an invalid file is refused
    (config_reload_refused) and the same process keeps running the old one."""
    pid = svc.main_pid()
    try:
        mark = svc.reload(config_text(vms=("web01", "web02")))
        reloaded = svc.journal.wait("config_reloaded", after=mark)
        assert reloaded["vms"] == 2
        assert svc.journal.find("vm_added", after=mark, vm="web02")
        mark = svc.reload(BASE_CONFIG + '[followup]\nstop_after_shutdown_s = "soon"\n')
        refused = svc.journal.wait("config_reload_refused", after=mark)
        assert any("stop_after_shutdown_s" in p for p in refused["problems"])
        assert svc.main_pid() == pid
        assert svc.show("ActiveState")["ActiveState"] == "active"
        mark = svc.reload(BASE_CONFIG)
        svc.journal.wait("config_reloaded", after=mark)
        assert svc.journal.find("vm_removed", after=mark, vm="web02")
        wait_until(
            "STATUS= without web02",
            lambda: svc.show("StatusText")["StatusText"] == status_line(1, 1, 0),
            30.0,
            interval=0.1,
        )
        assert svc.main_pid() == pid
    finally:
        svc.write_config(BASE_CONFIG)


def test_a_socket_the_group_cannot_write_gets_a_hint(svc: ServiceHost) -> None:
    """QEMU under umask 027 makes srwxr-x--- root:kvm: vm_connect_failed with reason
    permission names the socket's mode and the fix (UMask=0007, chmod g+w, [[listen]])."""
    svc.start_qemu("web03", umask="0027")
    try:
        mode = svc.ns.run("stat", "-c", "%A %U:%G", "/run/qemu/web03.qmp").stdout.strip()
        assert mode == "srwxr-x--- root:kvm"
        mark = svc.reload(config_text(vms=("web01", "web03")))
        failed = svc.journal.wait("vm_connect_failed", after=mark, vm="web03")
        assert failed["reason"] == "permission"
        hint = failed["hint"]
        assert "/run/qemu/web03.qmp is srwxr-x--- root:kvm" in hint
        assert "UMask=0007" in hint
        assert "chmod g+w /run/qemu/web03.qmp" in hint
        assert "[[listen]]" in hint
    finally:
        svc.reload(BASE_CONFIG)
        svc.ns.run("systemctl", "stop", "qemu@web03.service")


def test_the_watchdog_restarts_a_stopped_daemon(svc: ServiceHost) -> None:
    """With WatchdogSec=3s (a drop-in), a SIGSTOPed daemon misses its pings: systemd aborts it
    (SIGABRT) and starts it again, which connects again."""
    dropin = svc.ns.path("/run/systemd/system/qmpwatch.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=3s\nRestartSec=100ms\n")
    try:
        svc.ns.run("systemctl", "daemon-reload")
        svc.restart()
        restarts = int(svc.show("NRestarts")["NRestarts"])
        pid = svc.main_pid()
        mark = svc.journal.mark()
        svc.ns.run("kill", "-STOP", str(pid))
        svc.journal.wait_entry(
            "systemd's watchdog timeout",
            lambda e: "Watchdog timeout" in systemd_harness.text_of(e.get("MESSAGE", "")),
            after=mark,
            timeout=60.0,
        )
        svc.journal.wait("daemon_started", after=mark, timeout=60.0)
        svc.journal.wait("vm_connected", after=mark, vm="web01")
        props = svc.wait_ready()
        assert int(props["MainPID"]) != pid
        assert int(svc.show("NRestarts")["NRestarts"]) == restarts + 1
    finally:
        (dropin / "watchdog.conf").unlink()
        svc.ns.run("systemctl", "daemon-reload")
        svc.restart()


def test_restart_keeps_undelivered_alerts_and_reports_what_changed_while_down(
    svc: ServiceHost,
) -> None:
    """An alert a sink cannot take stays in the outbox across `systemctl restart`; a VM that
    resumed while qmpwatch was stopped is reported (its alert resolved) when it starts."""
    sinking = config_text(webhook="http://127.0.0.1:9/qmpwatch")  # nothing listens there
    try:
        svc.restart(sinking)
        mark = svc.journal.mark()
        svc.qmp("stop")
        alert = svc.journal.wait("alert", after=mark, vm="web01")
        svc.journal.wait("alert_delivery_failed", after=mark, fingerprint=alert["fingerprint"])
        mark = svc.restart()
        resumed = svc.journal.wait("alert_outbox_resumed", after=mark)
        assert resumed["undelivered"] >= 1
        svc.ns.run("systemctl", "stop", UNIT)
        svc.qmp("cont")  # while qmpwatch is down
        mark = svc.journal.mark()
        svc.ns.run("systemctl", "start", UNIT)
        resolved = svc.journal.wait("alert_resolved", after=mark, fingerprint=alert["fingerprint"])
        assert resolved["reason"] == "query-status says running"
        assert svc.journal.wait("alert_outbox_resumed", after=mark)["undelivered"] >= 1
    finally:
        svc.qmp("cont")  # resumed already unless the test failed before
        svc.ensure()


def test_journal_fields_with_log_target_journal(svc: ServiceHost) -> None:
    """daemon.log_target = "journal": entries with MESSAGE (the console line), PRIORITY,
    MESSAGE_ID per kind and QMPWATCH_* fields; `journalctl QMPWATCH_VM=web01` finds them."""
    journal_config = config_text(daemon={"log_target": "journal"})
    try:
        mark = svc.restart(journal_config)
        svc.journal.wait("vm_connected", after=mark, vm="web01")
        mark = svc.journal.mark()
        svc.qmp("stop")
        svc.journal.wait("alert", after=mark, vm="web01")
        svc.qmp("cont")
        svc.journal.wait("alert_resolved", after=mark, vm="web01")
        out = svc.ns.run("journalctl", "QMPWATCH_VM=web01", "--output=json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        by_event: dict[str, list[dict[str, str]]] = {}
        for entry in entries:
            assert entry["QMPWATCH_VM"] == "web01"
            assert entry["_SYSTEMD_UNIT"] == UNIT
            assert entry["SYSLOG_IDENTIFIER"] == "qmpwatch"
            record = json.loads(entry["QMPWATCH_JSON"])
            assert record["vm"] == "web01"
            assert entry["QMPWATCH_EVENT"] == record["event"]
            assert entry["MESSAGE_ID"] == message_id(record["event"])
            by_event.setdefault(record["event"], []).append(entry)
        stop = next(e for e in by_event["qmp_event"] if e.get("QMPWATCH_QMP") == "STOP")
        assert stop["MESSAGE"] == "web01 STOP"
        assert stop["PRIORITY"] == "6"
        (alert,) = by_event["alert"][-1:]
        assert alert["PRIORITY"] == "4"  # warning
        assert alert["QMPWATCH_ALERT"] == "vm_stopped_unexpected"
        assert re.fullmatch(
            r"web01 ALERT warning vm_stopped_unexpected: VM web01 .*", alert["MESSAGE"]
        )
        resolved = by_event["alert_resolved"][-1]
        assert resolved["MESSAGE"].startswith("web01 resolved vm_stopped_unexpected: ")
        connected = by_event["vm_connected"][-1]
        assert connected["MESSAGE"].startswith("web01 connected to /run/qemu/web01.qmp")
        ids = svc.ns.run(
            "journalctl", f"MESSAGE_ID={message_id('alert')}", "--output=json", "--no-pager"
        ).stdout.splitlines()
        assert ids
        assert all(json.loads(i)["QMPWATCH_EVENT"] == "alert" for i in ids)
    finally:
        svc.ensure()


def test_systemctl_stop_is_clean_and_quick(svc: ServiceHost) -> None:
    """`systemctl stop`: the daemon exits 0 well within TimeoutStopSec=, logs daemon_stopped,
    and leaves no process in its cgroup."""
    mark = svc.journal.mark()
    started = time.monotonic()
    svc.ns.run("systemctl", "stop", UNIT)
    took = time.monotonic() - started
    try:
        props = svc.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "MainPID")
        assert props["ActiveState"] == "inactive"
        assert props["Result"] == "success"
        assert (props["ExecMainCode"], props["ExecMainStatus"]) == ("1", "0")  # exited, 0
        assert props["MainPID"] == "0"
        svc.journal.wait("daemon_stopped", after=mark)
        assert took < STOP_QUICK_S, took
    finally:
        svc.ensure()


def test_every_source_watches_qemu_of_another_user_as_deployed(svc: ServiceHost) -> None:
    """The service (user qmpwatch) watches QEMUs of other users through each source: [[vm]]
    (root), [[discover]] (a libvirt-qemu-like user), [[listen]] on the README's socket in the
    unit's RuntimeDirectory (root, and that user): each connected; a pause alerts and `cont`
    resolves it; kill -9 alerts vm_crashed; the service never restarts."""
    vms = {"web01": "vm", "disc01": "discover", "dial01": "listen", "dial02": "listen"}
    dial_in = (
        f"-chardev socket,id=qmpwatch,path={LISTEN_SOCKET},reconnect=1 "
        "-mon chardev=qmpwatch,mode=control"
    )
    config = config_text() + "\n".join(
        [
            "[[discover]]",
            f'glob = "{DISCOVER_DIR}/*.qmp"',
            f'users = ["root", "{QEMU_USER}"]',  # the README's line for libvirt-qemu hosts
            "[[listen]]",
            f'socket = "{LISTEN_SOCKET}"',
            'group = "kvm"',
            f'users = ["root", "{QEMU_USER}"]',
            "",
        ]
    )
    pid = svc.main_pid()
    svc.add_user(QEMU_USER)  # before the config names it in `users`
    try:
        mark = svc.restart(config)
        pid = svc.main_pid()
        svc.journal.wait("listening", after=mark, socket=LISTEN_SOCKET)
        svc.start_vm("disc01", f"-qmp unix:{DISCOVER_DIR}/disc01.qmp,server=on,wait=off", QEMU_USER)
        svc.start_vm("dial01", dial_in)
        svc.start_vm("dial02", dial_in, QEMU_USER)
        for name, source in vms.items():
            connected = svc.journal.wait("vm_connected", after=mark, vm=name)
            assert connected["pid"] == svc.qemu_pid(name), (name, source)
        owners = {
            name: svc.ns.run("ps", "-o", "user=", "-p", str(svc.qemu_pid(name))).stdout.strip()
            for name in vms
        }
        assert owners == {"web01": "root", "disc01": QEMU_USER, "dial01": "root",
                          "dial02": QEMU_USER}  # fmt: skip
        assert svc.ns.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "qmpwatch"
        listen = svc.ns.path(LISTEN_SOCKET)
        assert stat.S_IMODE(listen.stat().st_mode) == 0o660
        assert stat.S_IMODE(listen.parent.stat().st_mode) == 0o2750
        assert stat.S_IMODE(listen.parent.parent.stat().st_mode) == 0o711
        kvm = int(svc.ns.run("getent", "group", "kvm").stdout.split(":")[2])
        assert (listen.stat().st_gid, listen.parent.stat().st_gid) == (kvm, kvm)
        for name in vms:
            svc.qmp("stop", vm=name)
            alert = svc.journal.wait("alert", after=mark, vm=name, alert="vm_stopped_unexpected")
            svc.qmp("cont", vm=name)
            svc.journal.wait("alert_resolved", after=mark, fingerprint=alert["fingerprint"])
        for name in ("disc01", "dial01", "dial02"):
            svc.ns.run("systemctl", "kill", "--signal=KILL", f"vm-{name}.service")
            crashed = svc.journal.wait("alert", after=mark, vm=name, alert="vm_crashed")
            assert crashed["severity"] == "critical"
        qemu = svc.qemu_pid("web01")
        svc.ns.run("kill", "-KILL", str(qemu))
        svc.journal.wait("alert", after=mark, vm="web01", alert="vm_crashed")
        assert svc.main_pid() == pid  # never restarted: nothing a peer did ended it
        assert svc.journal.find("internal_error", after=mark) is None
        assert svc.journal.find("listen_peer_refused", after=mark) is None
    finally:
        for name in ("disc01", "dial01", "dial02"):
            svc.stop_vm(name)
        svc.ns.run("systemctl", "restart", "qemu@web01.service")
        svc.ensure()


def test_systemd_analyze_security_of_the_installed_unit(svc: ServiceHost) -> None:
    """`systemd-analyze security qmpwatch.service` on the unit systemd loaded: exposure <= 1.5."""
    out = svc.ns.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    found = re.search(r"Overall exposure level for qmpwatch\.service: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= MAX_EXPOSURE, out


def test_make_uninstall_removes_what_install_made_and_keeps_config_and_state(
    svc: ServiceHost,
) -> None:
    """make uninstall: the service stopped and disabled, the unit, link and venv gone; the
    config, the state and the user stay; a second run is harmless. (Installed again by the
    next test that needs it.)"""
    ns = svc.ns
    svc.installed = False
    result = svc.sh("make uninstall")
    assert "qmpwatch.service: stopped and disabled" in result.stdout
    assert svc.show("LoadState")["LoadState"] == "not-found"
    for gone in (UNIT_PATH, VENV, "/usr/local/bin/qmpwatch"):
        assert not os.path.lexists(ns.path(gone)), gone
    assert ns.path(CONFIG).read_text() == BASE_CONFIG
    assert ns.path("/var/lib/qmpwatch").is_dir()
    assert ns.run("getent", "passwd", "qmpwatch", check=False).returncode == 0
    again = svc.sh("make uninstall")
    assert "removed" not in again.stdout
