"""The `discover` source: `[[discover]] glob = "/run/qemu/*.qmp"` -> one VM per unix socket.

The VM's name is the file name without its extension; each socket is dialed like a `[[vm]]`
(`qmpwatch.sources.dial`), which wins when both name one socket. A socket owned by a uid not in
the glob's `users` is refused; a name is pinned to its first socket and uid (the state store),
and among sockets claiming one name the one watched now keeps it. Only unix sockets count; a
match whose real path leads out of the glob's directory (`paths.glob_root`) through a symlink
is ignored, so a writable socket directory cannot point qmpwatch at arbitrary sockets. The
globs are rescanned when inotify says a watched directory changed, so nothing polls while
idle; a directory that does not exist yet is looked for again every `MISSING_DIR_POLL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import stat
from collections.abc import Iterable
from pathlib import PurePath

import structlog
from asyncinotify import Inotify, Mask

from qmpwatch.core.config import Config, DiscoverConfig
from qmpwatch.core.pins import Owner, refusal
from qmpwatch.sources.base import SessionHost
from qmpwatch.sources.dial import DialTarget, DialTargets
from qmpwatch.sources.guard import retried, step_failed
from qmpwatch.sources.paths import glob_root, inside
from qmpwatch.sources.trust import Throttle, allowed_uids

MISSING_DIR_POLL_S = 2.0
BURST_S = 0.05  # changes this close together are one rescan
_WATCH_MASK = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.ATTRIB
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
)


def discover(globs: Iterable[DiscoverConfig]) -> dict[str, tuple[str, DiscoverConfig]]:
    """Socket path -> (VM name, the glob that found it), for every matching unix socket."""
    found: dict[str, tuple[str, DiscoverConfig]] = {}
    for rule in globs:
        directory = glob_root(rule.glob)
        for path in sorted(glob.glob(rule.glob)):
            if path in found:
                continue
            try:
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    continue
            except OSError:
                continue  # vanished, or not ours to look at
            if not inside(path, directory):
                continue
            found[path] = (PurePath(path).stem, rule)
    return found


def socket_owner(path: str) -> int | None:
    """The uid owning the socket file `path` (the QEMU that made it), or None when gone."""
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def directories(globs: Iterable[DiscoverConfig]) -> tuple[set[str], bool]:
    """The directories whose entries decide what the globs match, and whether any of them
    is missing (then only a poll can see it appear)."""
    wanted: set[str] = set()
    missing = False
    for rule in globs:
        root = glob_root(rule.glob)
        parent = os.path.dirname(rule.glob) or "."
        found = glob.glob(parent) if glob.has_magic(parent) else [parent]
        for directory in {root, *found}:
            if os.path.isdir(directory):
                wanted.add(os.path.realpath(directory))
            else:
                missing = True
    return wanted, missing


class DiscoverSource:
    """`[[discover]]`: the sockets its globs match, found again whenever they change."""

    kind = "discover"

    def __init__(self, config: Config, host: SessionHost, tg: asyncio.TaskGroup) -> None:
        self.config = config
        self.targets = DialTargets(self.kind, host, tg, "no longer discovered (its socket is gone)")
        self.log = structlog.get_logger()
        self._said = Throttle()  # refusals and conflicts: at most once a minute each
        self._reconfigured = asyncio.Event()
        self._rescan_failed = False  # then rescan again in MISSING_DIR_POLL_S, changes or not
        self._watcher = tg.create_task(
            retried(self._watch_forever, where="discover: watch", delay_s=MISSING_DIR_POLL_S),
            name="discover",
        )

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.rescan()
        self._reconfigured.set()

    def rescan(self) -> None:
        """Match the globs now and start or stop dialing to match; a rescan that fails is
        recorded and done again in `MISSING_DIR_POLL_S`."""
        try:
            self._rescan()
        except Exception as err:
            self._rescan_failed = True
            step_failed(err, where="discover: rescan",
                        then=f"rescans in {MISSING_DIR_POLL_S:g} s")  # fmt: skip
        else:
            self._rescan_failed = False

    def _rescan(self) -> None:
        config = self.config
        configured = {vm.socket: vm.name for vm in config.vms}
        found: dict[str, list[tuple[str, DiscoverConfig, int]]] = {}
        for path, (name, rule) in discover(config.discover).items():
            if path in configured:
                continue  # a [[vm]] for the same socket wins
            uid = socket_owner(path)
            if uid is None:
                continue  # gone since
            if uid not in allowed_uids(rule.users):
                if self._said.due((path, uid, "user_not_allowed")):
                    self.log.warning(
                        "discover_socket_refused",
                        socket=path,
                        vm=name,
                        uid=uid,
                        reason="user_not_allowed",
                        error=f"{path} belongs to uid {uid}, not one of the glob's users",
                    )
                continue
            found.setdefault(name, []).append((path, rule, uid))
        wanted: dict[str, DialTarget] = {}
        for name, candidates in found.items():
            chosen = self._choose(name, candidates)
            if chosen is None:
                continue
            path, rule, uid = chosen
            self.targets.host.pin(name, Owner(uid, path))
            wanted[name] = DialTarget(
                name,
                path,
                rule.no_shutdown,
                glob_root(rule.glob),
                users=allowed_uids(rule.users),
                remediate=rule.remediate,
            )
        self.targets.apply(wanted, config.connect, on_refused=self._refused)

    def _choose(
        self, name: str, candidates: list[tuple[str, DiscoverConfig, int]]
    ) -> tuple[str, DiscoverConfig, int] | None:
        """The socket that keeps `name` among several: the one watched now, else the one the
        name is pinned to, else the first found; the others are conflicts. A socket of another
        uid than the pinned one never gets the name, nor another socket of the same uid while
        the pinned one is there."""
        pinned = self.targets.host.owner(name)
        paths = {path for path, _, _ in candidates}
        running = self.targets.running.get(name)
        keep = running.target.socket if running is not None else ""

        def allowed(path: str, uid: int) -> bool:
            why = refusal(pinned, Owner(uid, path))
            if why is None:
                return True
            return why == "name_socket_owned" and pinned is not None and pinned.socket not in paths

        ranked = sorted(
            candidates, key=lambda c: (c[0] != keep, pinned is None or c[0] != pinned.socket)
        )
        chosen = next((c for c in ranked if allowed(c[0], c[2])), None)
        for path, _, uid in candidates:
            if chosen is not None and path == chosen[0]:
                continue
            other = chosen[0] if chosen is not None else (pinned.socket if pinned else "")
            reason = "name_taken" if allowed(path, uid) else refusal(pinned, Owner(uid, path))
            self._conflict(path, name, other, reason=reason or "name_taken", uid=uid)
        return chosen

    def _refused(self, target: DialTarget) -> None:
        other = next((vm.socket for vm in self.config.vms if vm.name == target.name), "")
        self._conflict(target.socket, target.name, other, reason="name_taken")

    def _conflict(self, path: str, name: str, other: str, **fields: object) -> None:
        if self._said.due((path, str(fields.get("reason")))):
            self.log.warning(
                "discover_name_conflict", socket=path, vm=name, other_socket=other, **fields
            )

    async def _watch_forever(self) -> None:
        """Rescan whenever a watched directory changes (or the configuration does)."""
        while True:
            self._reconfigured.clear()
            watched, missing = directories(self.config.discover)
            if not watched and not missing:
                await self._reconfigured.wait()  # no globs: asleep until a reload adds some
                continue
            with Inotify() as inotify:
                for directory in watched:
                    with contextlib.suppress(OSError):  # gone since, or not ours to watch
                        inotify.add_watch(directory, _WATCH_MASK)
                await self._until_changed(inotify, watched, missing)

    async def _until_changed(self, inotify: Inotify, watched: set[str], missing: bool) -> None:
        """Rescan on every batch of changes; return when the directories to watch changed."""
        reconfigured = asyncio.ensure_future(self._reconfigured.wait())
        try:
            while not reconfigured.done():
                changed = asyncio.ensure_future(inotify.get())
                timeout = MISSING_DIR_POLL_S if missing or self._rescan_failed else None
                done, _ = await asyncio.wait(
                    {changed, reconfigured}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if changed in done:
                    await self._drain(inotify)
                else:
                    changed.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await changed
                self.rescan()
                if directories(self.config.discover) != (watched, missing):
                    return
        finally:
            reconfigured.cancel()

    @staticmethod
    async def _drain(inotify: Inotify) -> None:
        """Take the rest of a burst (QEMU creating a socket is several events; a host starting
        many VMs is many), so that one glob rescan answers them all."""
        while True:
            try:
                async with asyncio.timeout(BURST_S):
                    await inotify.get()
            except TimeoutError:
                return

    async def stop(self) -> None:
        self._watcher.cancel()
        await asyncio.wait([self._watcher])
        await self.targets.stop()
