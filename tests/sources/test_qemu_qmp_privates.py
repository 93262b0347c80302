"""The private names of qemu.qmp that qmpwatch relies on exist in the installed version."""

from __future__ import annotations

from importlib.metadata import requires, version

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from qmpwatch.sources.qmpclient import _ID_PREFIX, QEMU_QMP_PRIVATES, WatchClient


def _pinned() -> str:
    """qemu.qmp's requirement as qmpwatch's metadata states it (e.g. `qemu.qmp==0.0.6`)."""
    return next(r for r in requires("qmpwatch") or [] if r.startswith("qemu.qmp")).split(";")[0]


async def test_qemu_qmp_has_every_private_qmpwatch_relies_on() -> None:
    """Every (class, name) in QEMU_QMP_PRIVATES exists on an instance of that class; a
    missing one is named with the installed and the pinned qemu.qmp version."""
    instances: dict[str, object] = {"QMPClient": QMPClient("privates"), "Message": Message({})}
    missing = [
        f"{owner}.{name}"
        for owner, name in QEMU_QMP_PRIVATES
        if not hasattr(instances[owner], name)
    ]
    assert not missing, (
        f"qemu.qmp {version('qemu.qmp')} lacks {', '.join(missing)}, which "
        f"qmpwatch.sources.qmpclient relies on (pinned: {_pinned()}); see QEMU_QMP_PRIVATES"
    )


async def test_qemu_qmp_execute_ids_have_the_prefix_late_replies_are_told_by() -> None:
    """qemu.qmp numbers its command ids `__qmp#NNNNN` from `_execute_id` on, as
    WatchClient's late-reply check (`_unroutable`) expects."""
    client = QMPClient("privates")
    first = client._execute_id
    exec_id = client._get_exec_id()
    assert exec_id.startswith(_ID_PREFIX), (
        f"qemu.qmp {version('qemu.qmp')} (pinned: {_pinned()}) numbers commands {exec_id!r}, "
        f"not {_ID_PREFIX!r}+number"
    )
    assert int(exec_id.removeprefix(_ID_PREFIX)) == first
    assert client._execute_id == first + 1


def test_every_qemu_qmp_method_watchclient_overrides_is_listed() -> None:
    """A private method of QMPClient that WatchClient overrides is in QEMU_QMP_PRIVATES, so
    the list cannot fall behind the client."""
    overridden = {
        name
        for name in vars(WatchClient)
        if name.startswith("_") and not name.startswith("__") and hasattr(QMPClient, name)
    }
    listed = {name for owner, name in QEMU_QMP_PRIVATES if owner == "QMPClient"}
    assert overridden <= listed, f"not in QEMU_QMP_PRIVATES: {sorted(overridden - listed)}"
