"""The test lab: throwaway real QEMUs, driven from outside the way a guest would drive them.

Used by the test suite (ground truth for the daemon), bench and ``qmpwatch demo``; imports only
the standard library, qemu.qmp and qmpwatch.core.errors. One job per module, each importing
only modules named before it: errors, build (which QEMU), guestkit (a real Linux guest's
kernel and initramfs), spec (what to start), plan (run
directory, files, command line), control (the control monitor and its events), devices (the
guest's port recipes), vm (`LabVM`, the process). Design notes: docs/architecture.md.
"""

from qmpwatch.lab.build import QEMU_BINARY as QEMU_BINARY
from qmpwatch.lab.build import QEMU_DATA_DIR_ENV as QEMU_DATA_DIR_ENV
from qmpwatch.lab.build import QEMU_ENV as QEMU_ENV
from qmpwatch.lab.build import (
    QEMU_INSTALL_HINT,
    QemuBuild,
    QemuNotFound,
    kvm_usable,
    qemu_binary,
    require_qemu,
)
from qmpwatch.lab.build import QEMU_MODULE_DIR_ENV as QEMU_MODULE_DIR_ENV
from qmpwatch.lab.control import DEFAULT_EVENT_HISTORY as DEFAULT_EVENT_HISTORY
from qmpwatch.lab.control import LabEvent
from qmpwatch.lab.devices import PortWidth
from qmpwatch.lab.errors import LabClosed, LabError, LabTimeout, QemuStartError
from qmpwatch.lab.guestkit import GuestKit, fetch_kit
from qmpwatch.lab.plan import AGENT_PORT_ID as AGENT_PORT_ID
from qmpwatch.lab.plan import AGENT_PORT_NAME as AGENT_PORT_NAME
from qmpwatch.lab.plan import FIRMWARE_SIZE, halt_firmware
from qmpwatch.lab.plan import dial_in_args as dial_in_args
from qmpwatch.lab.spec import Accel as Accel
from qmpwatch.lab.spec import (
    BlkdebugSpec,
    ErrorPolicy,
    GuestSpec,
    LabSpec,
    PanicAction,
    ReadErrorPolicy,
    WatchdogAction,
)
from qmpwatch.lab.vm import LabVM

# __all__ is the one the single module had; the names imported "as" themselves were public
# there too (conftest imports the variables' names), and are still importable from here.
__all__ = [
    "FIRMWARE_SIZE",
    "QEMU_INSTALL_HINT",
    "BlkdebugSpec",
    "ErrorPolicy",
    "GuestKit",
    "GuestSpec",
    "LabClosed",
    "LabError",
    "LabEvent",
    "LabSpec",
    "LabTimeout",
    "LabVM",
    "PanicAction",
    "PortWidth",
    "QemuBuild",
    "QemuNotFound",
    "QemuStartError",
    "ReadErrorPolicy",
    "WatchdogAction",
    "fetch_kit",
    "halt_firmware",
    "kvm_usable",
    "qemu_binary",
    "require_qemu",
]
