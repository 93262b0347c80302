"""Scripts that walk a real QEMU (`qmpwatch.lab.LabVM`) through events, shared by the tests."""

from __future__ import annotations

from qmpwatch.lab import LabVM


async def basic_events(vm: LabVM, rounds: int = 1) -> None:
    """`rounds` times: stop, cont, a host reset and a guest reset (STOP, RESUME, 2 RESETs);
    then a clock write (RTC_CHANGE) and quit (SHUTDOWN)."""
    for _ in range(rounds):
        await vm.stop()
        await vm.cont()
        mark = vm.mark()
        await vm.system_reset()
        host = await vm.wait_event("RESET", after=mark)
        await vm.guest_reset()
        await vm.wait_event("RESET", after=host.seq)
    await vm.rtc_change()
    await vm.wait_event("RTC_CHANGE")
    await vm.quit()
