"""How long to wait before bringing back something that failed (a child process, a service, a link)."""

from __future__ import annotations

import time


class Backoff:
    """`first` seconds, doubling on each failure up to `cap`; back to `first` once the thing has stayed up
    `reset_after_s` (0: as soon as it is up again). Call `up()` when it is back, `next()` when it failed."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, reset_after_s: float = 60.0) -> None:
        self.first = first
        self.cap = cap
        self.reset_after_s = reset_after_s
        self.delay = first
        self.up_since: float | None = None

    def up(self) -> None:
        self.up_since = time.monotonic()

    def next(self) -> float:
        """The wait before the next attempt."""
        if self.up_since is not None and time.monotonic() - self.up_since >= self.reset_after_s:
            self.delay = self.first
        self.up_since = None
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay
