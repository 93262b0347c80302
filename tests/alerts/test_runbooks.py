"""Runbooks: one per alert kind in docs/runbooks, shipped with the package, served by the
daemon, and linked from alerts (`runbook_url`) together with `generatorURL`."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import aiohttp
import pytest

from qmpwatch.alerts.links import RUNBOOK_DIR, Links, external_url, links_for, runbook_path
from qmpwatch.core.alert import KINDS
from qmpwatch.core.config import AlertConfig, parse_config_text
from qmpwatch.core.crashcause import KINDS as CAUSE_KINDS
from qmpwatch.core.errors import ConfigError
from qmpwatch.core.protection import GAPS
from qmpwatch.service.httpserver import Health, HttpServer
from qmpwatch.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "runbooks"


@pytest.mark.parametrize("kind", KINDS)
def test_every_alert_kind_has_a_runbook(kind: str) -> None:
    """docs/runbooks/<kind>.md exists for every kind in KINDS (a kind added without its runbook
    fails here) and says what it means, what to check and how to fix it."""
    path = DOCS / f"{kind}.md"
    assert path.is_file(), f"write docs/runbooks/{kind}.md: alerts of kind {kind} link to it"
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# {kind}\n")
    for section in ("## What it means", "## Check", "## Fix"):
        assert section in text, f"{path.name}: no {section!r}"


@pytest.mark.parametrize("gap", sorted(GAPS))
def test_every_protection_gap_has_a_runbook(gap: str) -> None:
    """docs/runbooks/<gap>.md exists for every protection gap, is served like an alert's, and
    names the QEMU option, the libvirt XML and the Proxmox setting that close it."""
    path = DOCS / f"{gap}.md"
    assert path.is_file(), f"write docs/runbooks/{gap}.md: status and vm_protection name it"
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# {gap}\n")
    for section in ("## What it means", "## Check", "## Fix", "**QEMU**", "**libvirt**"):
        assert section in text, f"{path.name}: no {section!r}"
    assert "**Proxmox VE**" in text
    assert runbook_path(gap) == RUNBOOK_DIR / f"{gap}.md"


@pytest.mark.parametrize("cause", [*CAUSE_KINDS, "unknown"])
def test_the_crash_runbook_covers_every_cause(cause: str) -> None:
    """vm_crashed.md has a row for every crash cause qmpwatch can name."""
    text = (DOCS / "vm_crashed.md").read_text(encoding="utf-8")
    assert f"| `{cause}` |" in text


def test_the_package_ships_the_runbooks() -> None:
    """qmpwatch/runbooks is docs/runbooks (one set of files), and the wheel includes it."""
    assert RUNBOOK_DIR.is_symlink()
    assert RUNBOOK_DIR.resolve() == DOCS.resolve()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "runbooks/*.md" in project["tool"]["setuptools"]["package-data"]["qmpwatch"]
    for kind in KINDS:
        assert runbook_path(kind) == RUNBOOK_DIR / f"{kind}.md"


@pytest.mark.parametrize("kind", ["nope", "../pyproject", "README", "vm_crashed.md", ""])
def test_no_runbook_outside_the_kinds(kind: str) -> None:
    """Only `<kind>` names lead to a file: no traversal, no other files of the directory."""
    assert runbook_path(kind) is None


def test_links_default_to_the_daemons_endpoint_as_prometheus_does() -> None:
    """Without `alert.external_url` the external URL is http://<host or hostname>:<metrics
    port>; generatorURL is its /healthz and runbooks its /runbooks/<kind>."""
    host = socket.gethostname()
    assert external_url(AlertConfig(), "127.0.0.1:9752") == f"http://{host}:9752"
    links = links_for(AlertConfig(host="hv03"), "[::1]:9100")
    assert links == Links("http://hv03:9100/healthz", "http://hv03:9100/runbooks/{kind}")
    assert links.runbook_url("vm_crashed") == "http://hv03:9100/runbooks/vm_crashed"


def test_links_follow_the_config() -> None:
    """`alert.external_url` replaces the default base; `alert.runbook_url` the runbook links;
    with no HTTP endpoint and no external URL there is no generatorURL."""
    cfg = AlertConfig(external_url="https://qw.hv03.example/", runbook_url="")
    assert links_for(cfg, "127.0.0.1:9752") == Links(
        "https://qw.hv03.example/healthz", "https://qw.hv03.example/runbooks/{kind}"
    )
    wiki = AlertConfig(runbook_url="https://wiki.example/qmpwatch/{kind}")
    links = links_for(wiki, "")
    assert links.generator_url == ""
    assert links.runbook_url("vm_panicked") == "https://wiki.example/qmpwatch/vm_panicked"
    assert links_for(AlertConfig(), "") == Links("", "")


def test_link_keys_are_checked() -> None:
    """external_url must be http(s); runbook_url must say where the kind goes."""
    text = '[alert]\nexternal_url = "qw.example"\nrunbook_url = "https://wiki.example/runbook"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text)
    assert caught.value.problems == [
        'alert.external_url: expected an http:// or https:// URL, got "qw.example"',
        'alert.runbook_url: must contain "{kind}" (the alert kind), got '
        '"https://wiki.example/runbook"',
    ]
    cfg = parse_config_text('[alert]\nexternal_url = "http://a:1"\nrunbook_url = "file:///{kind}"')
    assert (cfg.alert.external_url, cfg.alert.runbook_url) == ("http://a:1", "file:///{kind}")


async def test_the_endpoint_serves_each_runbook() -> None:
    """GET /runbooks/<kind> answers the runbook as text for every kind, 404 for anything else."""
    async with (
        HttpServer("127.0.0.1:0", Metrics(), lambda: Health(True)) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):
        base = f"http://127.0.0.1:{server.port}/runbooks"
        for kind in KINDS:
            async with http.get(f"{base}/{kind}") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
                assert (await resp.text()).startswith(f"# {kind}\n")
        for bad in ("nope", "..%2Fpyproject", "README"):
            async with http.get(f"{base}/{bad}") as resp:
                assert resp.status == 404
