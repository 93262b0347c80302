"""The libvirt lab keeps to its own: it never stops another live run's libvirtd, and it
leaves /etc/libvirt/qemu.conf as it found it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qmpwatch.lab.libvirt import (
    LIBVIRTD_PID,
    OWNER_FILE,
    QEMU_CONF_TEXT,
    LibvirtLab,
    conf_to_restore,
    restore_conf,
    virsh_sync,
)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, None),  # no qemu.conf: none after
        (b'user = "qemu"\n', b'user = "qemu"\n'),  # the host's own: given back as it was
        (QEMU_CONF_TEXT.encode(), None),  # the lab's, left by a run that died: removed
    ],
)
def test_qemu_conf_is_put_back_as_found(
    tmp_path: Path, before: bytes | None, after: bytes | None
) -> None:
    """What qemu.conf held before the lab wrote its own is what it holds after."""
    conf = tmp_path / "qemu.conf"
    if before is not None:
        conf.write_bytes(before)
    saved = conf_to_restore(conf)
    conf.write_text(QEMU_CONF_TEXT)  # the lab's, while it runs
    restore_conf(conf, saved)
    assert (conf.read_bytes() if conf.exists() else None) == after


@pytest.mark.libvirt
def test_a_second_run_leaves_the_first_runs_libvirtd_alone(
    tmp_path: Path, libvirt_lab: LibvirtLab
) -> None:
    """Another test run starting a lab while this one's runs: it refuses, naming the owner,
    and this run's libvirtd goes on answering (same process)."""
    pid = LIBVIRTD_PID.read_text().strip()
    code = "import sys, pathlib; from qmpwatch.lab.libvirt import LibvirtLab; " \
           "LibvirtLab(pathlib.Path(sys.argv[1])).up()"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "libvirtd belongs to another test run" in done.stderr
    assert str(OWNER_FILE) in done.stderr
    assert LIBVIRTD_PID.read_text().strip() == pid
    assert "libvirt" in virsh_sync("version").lower()
