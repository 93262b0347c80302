"""Who may speak for a VM: the uids a source believes, and refusals said at most once a minute.

`users` of [[listen]] and [[discover]] names the uids whose QEMUs are believed; empty means
root and qmpwatch's own user. docs/architecture.md ("Trust boundaries"), README ("Security").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

REFUSAL_INTERVAL_S = 60.0  # the same refusal of the same peer is said at most this often
REMEMBERED_MAX = 4096  # refusals remembered; then the oldest are forgotten


def allowed_uids(users: Iterable[int]) -> frozenset[int]:
    """The uids believed: `users`, or root and this process's own user when empty."""
    chosen = frozenset(users)
    return chosen or frozenset({0, os.geteuid()})


class Throttle:
    """Whether to say something about a key now: the first time, then once per interval."""

    def __init__(
        self,
        interval_s: float = REFUSAL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._said: dict[object, float] = {}

    def due(self, key: object) -> bool:
        now = self._clock()
        said = self._said.get(key)
        if said is not None and now - said < self.interval_s:
            return False
        if len(self._said) >= REMEMBERED_MAX:
            for old in list(self._said)[: REMEMBERED_MAX // 2]:
                del self._said[old]
        self._said.pop(key, None)
        self._said[key] = now
        return True
