"""systemd/qmpwatch.service: hardened (systemd-analyze security) and valid (verify)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "qmpwatch.service"
MAX_EXPOSURE = 2.0
INSTALLED = "/opt/qmpwatch/venv/bin/qmpwatch"  # where `make install` puts it (scripts/install)
TIMEOUT_S = 60.0


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(path).exists():
        pytest.fail("systemd-analyze is missing: install the Debian package systemd")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def settings() -> dict[str, list[str]]:
    """The unit's assignments, "Section.Key" -> every value in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def entry_point() -> Path:
    """The installed `qmpwatch` script (of the environment running the tests)."""
    return Path(sysconfig.get_path("scripts")) / "qmpwatch"


def test_security_exposure_is_low() -> None:
    """`systemd-analyze security --offline=true` rates the unit's exposure at most 2.0."""
    result = run("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for qmpwatch\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_verify_is_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` has nothing to say about the unit (installed binary path
    swapped for this environment's qmpwatch script: `make install` is never run on this host)."""
    script = entry_point()
    assert script.exists(), f"{script} missing: install the package (pip install -e .)"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={script} "))
    result = run("verify", "--man=no", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_exec_start_is_a_valid_command_line() -> None:
    """The arguments of ExecStart= are ones `qmpwatch run` accepts."""
    (exec_start,) = settings()["Service.ExecStart"]
    binary, *args = exec_start.split()
    assert binary == INSTALLED
    assert args == ["run", "-c", "/etc/qmpwatch/config.toml"]
    probe = subprocess.run(
        [sys.executable, "-m", "qmpwatch", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr


def test_service_contract() -> None:
    """The settings the daemon relies on: notify, watchdog, SIGHUP reload, state dir."""
    s = settings()
    assert s["Service.Type"] == ["notify"]
    assert s["Service.NotifyAccess"] == ["main"]
    assert s["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.WatchdogSec"][0]
    assert s["Service.StateDirectory"] == ["qmpwatch"]
    assert s["Service.User"] == ["qmpwatch"]
    assert s["Service.SupplementaryGroups"]
    assert "DynamicUser" not in s


def test_the_readme_listen_socket_lives_in_the_units_runtime_directory() -> None:
    """The README's and config.example.toml's [[listen]] socket is in /run/qmpwatch/listen,
    under the unit's RuntimeDirectory=: setgid, in the QEMU sockets' group."""
    s = settings()
    assert s["Service.RuntimeDirectory"] == ["qmpwatch"]
    assert s["Service.RuntimeDirectoryMode"] == ["0711"]
    group = s["Service.SupplementaryGroups"][0].split()[0]  # the QEMU sockets' group comes first
    listen_dir = f"+/usr/bin/install -d -m 2750 -o qmpwatch -g {group} /run/qmpwatch/listen"
    assert s["Service.ExecStartPre"] == [listen_dir]
    root = UNIT.parent.parent
    for doc in (root / "README.md", root / "config.example.toml"):
        # `socket = ` at a line's start: the sources' sockets, not daemon.api_socket
        paths = set(re.findall(r'(?m)^[#\s]*socket = "(/[^"]+)"', doc.read_text()))
        listen = {p for p in paths if "qmpwatch" in p}
        assert listen == {"/run/qmpwatch/listen/qmp.sock"}, (doc, paths)


def test_hardening_asked_for() -> None:
    """The sandboxing options the issue names are all set as asked."""
    s = settings()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[f"Service.{key}"] == [value], key
    assert "@system-service" in s["Service.SystemCallFilter"]


def test_install_paths_agree_in_unit_readme_and_make_install() -> None:
    """The venv ExecStart= runs, the unit's and the drop-in's paths: the same in the unit, its
    comments, scripts/install (make install) and the README (they were three different paths)."""
    root = UNIT.parent.parent
    script = (root / "scripts" / "install").read_text()
    readme = (root / "README.md").read_text()
    unit = UNIT.read_text()
    venv = INSTALLED.removesuffix("/bin/qmpwatch")
    assert f"VENV={venv}\n" in script
    assert "UNIT_DIR=/usr/local/lib/systemd/system\n" in script
    assert f"the venv {venv} that ExecStart=" in unit
    dropin = "/etc/systemd/system/qmpwatch.service.d/override.conf"
    assert dropin in unit
    for text in (readme, unit):
        assert "/usr/local/lib/systemd/system" in text
    assert f"`{INSTALLED}`" in readme
    assert "\nmake install " in readme
    assert "/opt/qmpwatch/bin/" not in readme + unit  # the old, wrong venv path
