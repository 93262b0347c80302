"""session.deathwatch: what a dead process's PID tells, read from the real host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from qmpwatch.session.deathwatch import Witness, _cgroup_facts, exit_state, find_cause

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


async def test_an_unreaped_child_killed_by_9_is_named_by_its_signal() -> None:
    """A child of this process killed with SIGKILL and not yet reaped (a zombie): its wait
    status says signal 9, at once, without waiting for the deadline."""
    # Popen, not asyncio's subprocess: asyncio's child watcher would reap it at once.
    child = subprocess.Popen(SLEEPER)  # noqa: ASYNC220
    try:
        witness = Witness.of(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while exit_state(child.pid)[0] == "alive":  # the kernel finishes the exit
            assert time.monotonic() < deadline, "SIGKILL did not end the child in 10 s"
            os.sched_yield()
        assert exit_state(child.pid) == ("zombie", signal.SIGKILL)
        cause = await find_cause(witness, wait_s=30.0)
    finally:
        child.kill()
        child.wait()
    assert cause.kind == "signal"
    assert cause.words == "killed by signal 9 (KILL)"
    assert cause.source == "exit_status"
    assert exit_state(child.pid) == ("gone", None)


def test_cgroup_facts_of_v1_v2_and_systemd_units() -> None:
    """The memory cgroup and the unit from /proc/PID/cgroup, whatever the hierarchy."""
    v1 = "4:memory:/qmpwatch-oom-1\n1:name=systemd:/system.slice/qemu@web01.service\n0::/\n"
    memcg, oom_file, unit = _cgroup_facts(v1)
    assert (memcg, unit) == ("/qmpwatch-oom-1", "qemu@web01.service")
    assert oom_file == "/sys/fs/cgroup/memory/qmpwatch-oom-1/memory.oom_control"
    assert _cgroup_facts("0::/\n") == ("", "", "")
    _, _, unit = _cgroup_facts("0::/machine.slice/qemu@db01.service\n")
    assert unit == "qemu@db01.service"
