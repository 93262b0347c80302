"""Capped exponential backoff with jitter, for reconnects and alert deliveries; and when to log
failures that repeat."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Attempt n waits `initial * 2^(n-1)`, at most `maximum`, times a random factor in
    [0.5, 1]; `next()` counts the attempts itself until `reset()`."""

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng
        self.failures = 0

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(max(attempt - 1, 0), 60))
        return base * (0.5 + 0.5 * self.rng())

    def next(self) -> float:
        """The delay before the next attempt after one more failure."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


class FailureLog:
    """When to log a failure that repeats: when its reason changes, else at most once per
    `interval_s`; `attempts` counts the failures since the last success."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.reason = ""
        self.logged_at = 0.0
        self.attempts = 0

    def failed(self, reason: str, now: float) -> bool:
        """One more failure at `now` (monotonic): whether to log it."""
        self.attempts += 1
        if reason != self.reason or now - self.logged_at >= self.interval_s:
            self.reason, self.logged_at = reason, now
            return True
        return False

    def succeeded(self) -> None:
        self.reason, self.attempts = "", 0
