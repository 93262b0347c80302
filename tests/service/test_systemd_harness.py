"""The real-systemd harness itself (tests/support/systemd_harness.py): it says what is missing
instead of skipping, and leaves nothing on the host, whether the boot worked or not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import systemd_harness
from tests.support.systemd_harness import (
    CGROUP_ROOT,
    Leftovers,
    SystemdNamespace,
    SystemdUnavailable,
    booted,
    wait_until,
)


def host_state(work: Path) -> tuple[list[str], list[str], str]:
    """What a run must not change: /sys/fs/cgroup's entries, the mount points under it and
    under the work directory (not the whole table: other test runs share this machine), and
    the options of the /sys/fs/cgroup file system (systemd remounts its own read-only)."""
    ours = [m for m, _ in systemd_harness.mounts() if m.startswith((str(CGROUP_ROOT), str(work)))]
    options = next(
        line.split(" - ")[1]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(CGROUP_ROOT)
    )
    return sorted(os.listdir(CGROUP_ROOT)), sorted(ours), options


def trees(name: str) -> list[Path]:
    return [h / name for h in systemd_harness.all_hierarchies() if (h / name).exists()]


def test_what_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without util-linux's programs on PATH the requirements name each one (the tests then
    fail with that list; they never skip)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = systemd_harness.requirements()
    for program in ("unshare", "nsenter", "setpriv", "mountpoint"):
        assert f"{program} (Debian package util-linux)" in missing


def test_a_boot_that_fails_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    """A namespace that dies before systemd (here: a bind outside /mnt, refused) is a
    SystemdUnavailable carrying its output; close() removes its cgroups and mounts."""
    before = host_state(tmp_path)
    ns = SystemdNamespace(tmp_path / "ns", {tmp_path: "/etc/elsewhere"})
    with pytest.raises(SystemdUnavailable, match="bind destinations go under /mnt"):
        ns.boot()
    ns.close()
    assert not trees(ns.name)
    assert host_state(tmp_path) == before
    assert not (tmp_path / "ns").exists()


def test_a_booted_systemd_is_torn_down_completely(tmp_path: Path) -> None:
    """systemd runs on the overlay as PID 1 and runs a service; after close() no process,
    cgroup or mount of it is left, and the host's /sys/fs/cgroup is as it was (writable)."""
    before = host_state(tmp_path)
    with booted(tmp_path / "ns", {}) as ns:
        assert ns.run("stat", "-f", "-c", "%T", "/").stdout.strip() == "overlayfs"
        assert ns.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        done = ns.run("systemd-run", "--wait", "--quiet", "--pipe", "echo", "hello").stdout
        assert done.strip() == "hello"
        assert trees(ns.name)  # its private subtree, while it runs
        name = ns.name
    assert not trees(name)
    assert host_state(tmp_path) == before
    assert not (tmp_path / "ns").exists()


def test_close_reports_what_it_could_not_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process the harness cannot end in its cgroup is a Leftovers error naming the cgroup,
    not a silent pass (here a process of the test's own, put in the namespace's subtree)."""
    monkeypatch.setattr(systemd_harness, "TEARDOWN_TIMEOUT_S", 0.2)
    ns = SystemdNamespace(tmp_path / "ns", {})
    tree = systemd_harness.cgroup_hierarchies()[0] / ns.name
    (tree / "stuck").mkdir(parents=True)
    with subprocess.Popen(["sleep", "600"]) as sleeper:
        try:
            (tree / "stuck" / "cgroup.procs").write_text(str(sleeper.pid))
            with pytest.raises(Leftovers, match=f"cgroup {tree} left"):
                ns.close()
        finally:
            sleeper.kill()
    wait_until("the cgroup to empty", lambda: not systemd_harness.processes_in(tree), 30.0)
    systemd_harness.remove_tree(tree)
    assert not trees(ns.name)
