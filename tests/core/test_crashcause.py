"""core.crashcause: the host's reports about a PID turned into one cause in words."""

from __future__ import annotations

from qmpwatch.core import crashcause as cc

PID = 28802
OOM_LINES = [
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    f"oom_memcg=/machine/web01,task_memcg=/machine/web01,task=qemu-system-x86,pid={PID},uid=0",
    f"Memory cgroup out of memory: Killed process {PID} (qemu-system-x86) total-vm:2454452kB, "
    "anon-rss:4299161kB, file-rss:21548kB, shmem-rss:0kB, UID:0 pgtables:720kB oom_score_adj:0",
]


def test_a_memcg_oom_kill_names_the_cgroup_and_anon_rss() -> None:
    """The kernel's two OOM lines for the PID: the cgroup and the anon-rss in GiB, settled."""
    cause = cc.from_kernel_log(OOM_LINES, PID)
    assert cause is not None
    assert cause.words == (
        "killed by the kernel's OOM killer (memory cgroup /machine/web01, anon-rss 4.1 GiB)"
    )
    assert cause.details["anon_rss_bytes"] == 4299161 * 1024
    assert cc.settled(cause)


def test_a_rate_limited_oom_dump_takes_the_cgroup_qmpwatch_knew() -> None:
    """Without the kernel's `oom-kill:` line (rate-limited), the cgroup QEMU was in names it."""
    cause = cc.from_kernel_log(OOM_LINES[1:], PID, "/machine/web01")
    assert cause is not None
    assert cause.details["memory_cgroup"] == "/machine/web01"
    assert "(memory cgroup /machine/web01, anon-rss 4.1 GiB)" in cause.words


def test_the_context_line_alone_is_an_oom_kill_not_yet_settled() -> None:
    """The line printed before the kill already names the victim; its anon-rss follows."""
    cause = cc.from_kernel_log(OOM_LINES[:1], PID)
    assert cause is not None
    assert cause.kind == "oom_kill"
    assert not cc.settled(cause)


def test_another_pid_is_never_blamed() -> None:
    """Lines about another process (same name) say nothing about this PID."""
    assert cc.from_kernel_log(OOM_LINES, PID + 1) is None
    line = f"qemu-system-x86[{PID + 1}]: segfault at 0 ip 0 sp 0 error 4 in qemu[5000+1000]"
    assert cc.from_kernel_log([line], PID) is None


def test_a_host_oom_says_the_host_ran_out() -> None:
    """A global OOM kill (no cgroup) says the host ran out of memory."""
    line = f"Out of memory: Killed process {PID} (qemu-system-x86) total-vm:1kB, anon-rss:2048kB"
    cause = cc.from_kernel_log([line], PID)
    assert cause is not None
    assert (
        cause.words
        == "killed by the kernel's OOM killer (the host ran out of memory, anon-rss 2 MiB)"
    )


def test_a_segfault_with_a_core_dump_says_both() -> None:
    """A segfault line and systemd-coredump's entry for the PID: one cause, core dumped."""
    seg = cc.from_kernel_log(
        [f"qemu-system-x86[{PID}]: segfault at 8 ip 00005 sp 00007 error 4 in qemu-system-x86_64"],
        PID,
    )
    dump = cc.from_coredump(
        {"COREDUMP_PID": str(PID), "COREDUMP_SIGNAL_NAME": "SIGSEGV", "COREDUMP_SIGNAL": "11",
         "COREDUMP_EXE": "/usr/bin/qemu-system-x86_64"},
        PID,
    )  # fmt: skip
    cause = cc.decide([dump, seg])
    assert cause.kind == "segfault"
    assert cause.words == "segfault in qemu-system-x86 (core dumped)"
    assert dump is not None
    assert dump.words == "segfault in qemu-system-x86_64 (core dumped)"


def test_unit_results_in_words() -> None:
    """systemd's Result= for the unit whose main PID was QEMU's; another main PID is ignored."""
    props = {
        "ExecMainPID": str(PID),
        "ExecMainCode": "2",
        "ExecMainStatus": "9",
        "Result": "signal",
    }
    cause = cc.from_unit("qemu@web01.service", props, PID)
    assert cause is not None
    assert cause.words == "killed by signal 9 (KILL) (systemd unit qemu@web01.service)"
    oom = cc.from_unit("q.service", {**props, "Result": "oom-kill"}, PID)
    assert oom is not None
    assert oom.kind == "oom_kill"
    assert cc.from_unit("q.service", {**props, "ExecMainPID": "1"}, PID) is None


def test_exit_status_libvirt_and_unknown() -> None:
    """A zombie's signal, libvirt's reason, and nothing at all."""
    killed = cc.from_exit_status("killed", 9)
    assert killed is not None
    assert killed.words == "killed by signal 9 (KILL)"
    assert (
        cc.libvirt_stop_reason("libvirt: the domain stopped (failed): QEMU went away") == "failed"
    )
    libvirt = cc.from_libvirt("failed")
    assert libvirt is not None
    assert cc.decide([libvirt, killed]).kind == "signal"
    assert cc.decide([None]) is cc.UNKNOWN
    assert cc.decide([cc.from_cgroup_oom("/x", 0, 0)]) is cc.UNKNOWN
