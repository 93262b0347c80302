"""The lab's exceptions; `QemuNotFound` is in `build`, beside the names its message quotes.

LabError (a QmpwatchError)  anything the lab raises on purpose
 ├── QemuNotFound           no qemu-system-x86_64; says what to install
 ├── QemuStartError         QEMU exited or hung during start-up; holds its stderr
 ├── LabClosed              the control monitor is gone (QEMU exited or was killed)
 └── LabTimeout             a bounded wait ran out (also a TimeoutError)
"""

from __future__ import annotations

from qmpwatch.core.errors import QmpwatchError


class LabError(QmpwatchError):
    """Anything the lab raises on purpose."""


class QemuStartError(LabError):
    """QEMU exited, or did not open its monitors, during start-up."""

    def __init__(self, message: str, *, stderr: str, returncode: int | None) -> None:
        detail = f"{message} (exit status {returncode})" if returncode is not None else message
        if stderr.strip():
            detail += "\nQEMU stderr:\n" + stderr.rstrip()
        super().__init__(detail)
        self.stderr = stderr
        self.returncode = returncode


class LabClosed(LabError):
    """The control monitor is gone: QEMU exited, was killed, or the lab was closed."""


class LabTimeout(LabError, TimeoutError):
    """A bounded wait of the lab ran out."""
