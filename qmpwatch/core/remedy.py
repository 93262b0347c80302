"""Resuming a VM after an I/O-error pause (`[remediate] resume_after_io_error`): the plan.

Pure: the watch core asks it when to try `cont` next and tells it what happened. Attempts are
spaced by jittered exponential backoff from the pause on; a `cont` that QEMU refuses, or a VM
that pauses again within `SETTLE_S` of running, is a failed attempt; a VM still running after
`SETTLE_S` is resumed. Past `resume_give_up_after_s` since the pause it gives up.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpwatch.core.backoff import Backoff
from qmpwatch.core.config import RemediateConfig

SETTLE_S = 3.0  # running this long after our cont: the storage is back


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
        self.next_at = now + self.backoff.next()
