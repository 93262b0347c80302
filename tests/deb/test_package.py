"""The packages as files (no install): lintian, what they hold, the unit derived from the repo's."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

from tests.support.debs import Packages
from tests.support.service_host import ROOT

VENV = "/opt/qmpwatch/venv"


def members(deb: Path) -> dict[str, tarfile.TarInfo]:
    """The files of a package by their installed path."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        return {m.name.removeprefix("."): m for m in archive.getmembers()}


def file_of(deb: Path, path: str) -> str:
    return subprocess.run(
        ["sh", "-c", f"dpkg-deb --fsys-tarfile '{deb}' | tar -xO '.{path}'"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def control_file(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--info", str(deb), name], capture_output=True, text=True, check=True
    ).stdout


def directives(unit: str) -> list[str]:
    """A unit's lines that are not comments or blank."""
    return [line for line in unit.splitlines() if line.strip() and not line.startswith("#")]


def test_lintian_reports_no_error_and_no_warning(debs: Packages) -> None:
    """lintian on both packages: no error, no warning (the overrides in debian/ say why each
    remaining one does not apply)."""
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(debs.main), str(debs.libvirt)],
        capture_output=True,
        text=True,
        check=False,
    )
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert tags == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_holds_the_venv_the_config_the_link_and_the_docs(debs: Packages) -> None:
    """qmpwatch: the venv on Debian's python3, /usr/bin/qmpwatch into it, the example config as
    the conffile /etc/qmpwatch/config.toml beside /etc/default/qmpwatch, the README and the
    man page; libvirt's bindings only in qmpwatch-libvirt."""
    files = members(debs.main)
    link = files["/usr/bin/qmpwatch"]
    assert link.issym()
    assert link.linkname == f"{VENV}/bin/qmpwatch"
    python = files[f"{VENV}/bin/python3.11"]
    assert python.issym()
    assert python.linkname == "/usr/bin/python3.11"
    assert file_of(debs.main, f"{VENV}/bin/qmpwatch").startswith(f"#!{VENV}/bin/python\n")
    assert any(re.match(rf"{VENV}/lib/python3\.11/site-packages/qemu/qmp/", f) for f in files)
    bindings = [f for f in files if re.search(r"/site-packages/libvirt[^/]*$", f)]
    assert bindings == [], "libvirt's bindings belong to qmpwatch-libvirt"
    assert not any("__pycache__" in f for f in files), "bytecode is compiled by the postinst"
    for doc in ("README.md.gz", "copyright"):
        assert f"/usr/share/doc/qmpwatch/{doc}" in files
    assert "/usr/share/man/man1/qmpwatch.1.gz" in files
    assert control_file(debs.main, "conffiles").split() == [
        "/etc/default/qmpwatch",
        "/etc/qmpwatch/config.toml",
    ]
    assert (
        file_of(debs.main, "/etc/qmpwatch/config.toml")
        == (ROOT / "config.example.toml").read_text()
    )
    build_paths = subprocess.run(
        ["sh", "-c", f"dpkg-deb --fsys-tarfile '{debs.main}' | grep -ac '{ROOT}/build'"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert build_paths == "0", "a path of the build machine is left in the package"
    libvirt = members(debs.libvirt)
    assert f"{VENV}/lib/python3.11/site-packages/libvirt.py" in libvirt
    assert f"{VENV}/lib/python3.11/site-packages/libvirtaio.py" in libvirt
    depends = control_file(debs.libvirt, "control")
    assert f"qmpwatch (= {debs.version})" in depends
    assert "libvirt0" in depends


def test_the_packaged_unit_is_the_repos_with_the_venv_and_without_supplementary_groups(
    debs: Packages,
) -> None:
    """/lib/systemd/system/qmpwatch.service is systemd/qmpwatch.service as it is in the checkout
    (every directive, in order: lines others add carry over), but SupplementaryGroups= (the
    user's groups from /etc/default/qmpwatch apply) and a Documentation= line."""
    packaged = directives(file_of(debs.main, "/lib/systemd/system/qmpwatch.service"))
    source = directives((ROOT / "systemd" / "qmpwatch.service").read_text())
    venv_start = [
        re.sub(r"^ExecStart=\S*/qmpwatch ", f"ExecStart={VENV}/bin/qmpwatch ", line)
        for line in source
    ]
    assert [line for line in packaged if not line.startswith("Documentation=")] == [
        line for line in venv_start if not line.startswith("SupplementaryGroups=")
    ]
    assert f"ExecStart={VENV}/bin/qmpwatch run -c /etc/qmpwatch/config.toml" in packaged
    assert "User=qmpwatch" in packaged
