"""Resuming a VM after an I/O-error pause (`[remediate] resume_after_io_error`): the plan.

Pure: the watch core asks it when to try `cont` next and tells it what happened. Attempts are
spaced by jittered exponential backoff from the pause on; a `cont` that QEMU refuses, or a VM
that pauses again within `SETTLE_S` of running, is a failed attempt; a VM still running after
`SETTLE_S` is resumed. Past `resume_give_up_after_s` since the pause it gives up.

A pause on a full disk (ENOSPC, or a cause unknown because the VM was found paused) also
follows the storage: the session reports the free bytes where the writable images live
(`space`), and space coming back makes the next attempt due at once; while nothing changes
the backoff alone spaces the attempts. A pause on another error (EIO) keeps the backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qmpwatch.core.backoff import Backoff
from qmpwatch.core.config import RemediateConfig

SETTLE_S = 3.0  # running this long after our cont: the storage is back
SPACE_GROWTH_MIN = 64 * 1024  # bytes more free on a file system than last seen: space is back


@dataclass(slots=True)
class Resumer:
    """The resume attempts for the current io-error pause of one VM."""

    config: RemediateConfig
    paused_at: float | None = None  # the pause being worked on; None: idle
    attempts: int = 0
    next_at: float | None = None  # when to send the next cont
    sent: bool = False  # a cont of ours is unanswered
    settle_until: float | None = None  # running after our cont; resumed if so until then
    backoff: Backoff | None = None
    nospace: bool | None = None  # the pause's disk error was ENOSPC (None: unknown)
    free: dict[str, int] = field(default_factory=dict)  # mount -> free bytes last seen
    trigger: str = "backoff"  # what made the attempt in flight due: "backoff", "space"

    @property
    def active(self) -> bool:
        return self.paused_at is not None

    def start(self, now: float) -> None:
        """The VM paused on an I/O error: plan the first attempt."""
        if self.active or not self.config.resume_after_io_error:
            return
        cfg = self.config
        self.backoff = Backoff(cfg.resume_backoff_initial_s, cfg.resume_backoff_max_s)
        self.paused_at = now
        self.attempts = 0
        self.next_at = now + self.backoff.next()
        self.sent = False
        self.settle_until = None

    def stop(self) -> None:
        """Nothing more to do for this pause (resumed, given up, or not ours to act on)."""
        self.paused_at = self.next_at = self.settle_until = self.backoff = None
        self.sent = False
        self.attempts = 0
        self.nospace = None
        self.free = {}
        self.trigger = "backoff"

    def wants_space(self) -> bool:
        """Whether the free space where the images live decides the next attempt now."""
        return (
            self.active
            and self.nospace is not False
            and not self.sent
            and self.settle_until is None
        )

    def space(self, free: Mapping[str, int], now: float) -> bool:
        """The free bytes of the file systems holding the images: True when space came back
        on one of them since last seen, making the next attempt due now."""
        if not self.wants_space():
            return False
        # A full disk had no space at the pause; a pause of unknown cause: what is seen first.
        before = {m: self.free.get(m, 0 if self.nospace else size) for m, size in free.items()}
        back = any(size - before[mount] >= SPACE_GROWTH_MIN for mount, size in free.items())
        self.free.update(free)
        if back and self.next_at is not None and self.next_at > now:
            self.next_at = now
            self.trigger = "space"
            return True
        return False

    def due(self) -> float | None:
        """The next time something is to be done (None: nothing planned)."""
        if not self.active or self.sent:
            return None
        if self.settle_until is not None:
            return self.settle_until
        return self.next_at

    def give_up_due(self, now: float) -> bool:
        assert self.paused_at is not None
        return now - self.paused_at >= self.config.resume_give_up_after_s

    def failed(self, now: float) -> None:
        """This attempt did not resume the VM: plan the next one."""
        assert self.backoff is not None
        self.sent = False
        self.settle_until = None
        self.trigger = "backoff"
        self.next_at = now + self.backoff.next()
