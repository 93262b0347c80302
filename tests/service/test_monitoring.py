"""The Prometheus rules and the Grafana dashboard of monitoring/: real promtool checks and unit
tests, and every metric they use scraped from a real daemon watching a real QEMU."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from qmpwatch.lab import LabSpec, LabVM
from tests.support.daemon_harness import DaemonProcess, lab_config
from tests.support.scrape import samples, scrape

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "qmpwatch.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "qmpwatch.rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "qmpwatch.json"
# Metric names: qmpwatch's own and the process_* ones it exports (not Prometheus' `up`).
METRIC = re.compile(r"\b(?:qmpwatch|process)_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Used by the dashboard but never sampled in this run: real QEMU cannot send a message that
# does not decode (the family is still declared, which is what catches a renamed metric).
NOT_SAMPLED = {"qmpwatch_decode_errors_total"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "no promtool: apt-get install prometheus (`make test` installs it: "
            "scripts/ensure-system-deps test)"
        )
    return found


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def rule_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(text: str) -> set[str]:
    return set(METRIC.findall(text))


async def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts the rules file: every expression parses, every rule is
    well formed."""
    status, out = await run(promtool(), "check", "rules", str(RULES))
    assert status == 0, out
    assert f"SUCCESS: {len(rule_names())} rules found" in out


async def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules` runs the rules' unit tests: each alert fires when it should, with
    its labels and annotations, and stays quiet when it should."""
    status, out = await run(promtool(), "test", "rules", str(RULE_TESTS))
    assert status == 0, out
    assert "SUCCESS" in out


def test_every_rule_has_a_unit_test_that_fires_it() -> None:
    """The rules cover what they are for, and each one is seen firing in the unit tests."""
    names = rule_names()
    assert set(names) >= {
        "QmpwatchDown",
        "QmpwatchMissing",
        "QmpwatchVmDisconnected",
        "QmpwatchVmNotRunning",
        "QmpwatchOutboxGrowing",
        "QmpwatchDeliveriesFailing",
        "QmpwatchDegraded",
    }
    tests = RULE_TESTS.read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    assert fired == set(names)
    assert quiet == set(names)


def test_dashboard_is_well_formed() -> None:
    """The dashboard is Grafana JSON: unique panel ids, panels inside the 24-column grid,
    every query on the data-source variable with a unique refId, variables that exist."""
    board = dashboard()
    assert board["uid"] == "qmpwatch"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "instance", "vm"}
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["description"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, (p["title"], used)
    titles = {p["title"] for p in panels}
    assert {"VM status over time", "QMP events by kind", "Alerts raised"} <= titles


@pytest.mark.qemu
async def test_every_metric_the_rules_and_the_dashboard_use_exists(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A real daemon watches a real QEMU through a client stop and resume (an alert, delivered
    to a command, then resolved), a guest poweroff under -no-shutdown (a follow-up), and the
    VM quitting (a disconnect, then failed connects). Its /metrics then has a sample of every
    metric the rules and the dashboard use, and passes `promtool check metrics`."""
    used = metric_names(RULES.read_text())
    for expr in dashboard_exprs():
        used |= metric_names(expr)
    assert "qmpwatch_vm_status" in used
    assert "qmpwatch_degraded" in used
    async with LabVM.start(LabSpec(name="web01", no_shutdown=True), sock_dir) as vm:
        cfg = lab_config(
            tmp_path,
            vm,
            metrics_port=0,
            arrays={"alert.exec": [{"command": ["true"]}]},
            no_shutdown=True,
        )
        async with DaemonProcess.start(cfg) as daemon:
            port = daemon.metrics_port
            await daemon.wait_for("vm_connected", vm="web01")
            await vm.stop()
            await daemon.wait_for("alert_delivered", vm="web01", status="firing")
            await vm.cont()
            await daemon.wait_for("alert_resolved", vm="web01")
            await vm.guest_poweroff()
            await daemon.wait_for("followup_satisfied", vm="web01", rule="stop_after_shutdown")
            await vm.quit()
            await daemon.wait_for("vm_disconnected", vm="web01")
            await daemon.wait_for("vm_connect_failed", vm="web01")
            await daemon.wait_for("alert_delivered", vm="web01", status="resolved")
            text = await scrape(port)
            assert await daemon.stop() == 0

    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    sampled = {s.name for s in samples(text)}
    for name in sorted(used):
        family = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        assert name in declared or family in declared, f"{name}: not exported by qmpwatch"
        if name not in NOT_SAMPLED:
            assert name in sampled, f"{name}: exported but no sample after the scripted run"
    proc = await asyncio.create_subprocess_exec(
        promtool(), "check", "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, out.decode()
