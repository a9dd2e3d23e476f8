"""Bounded concurrency: N jobs at once, a bounded queue behind them, 503 + Retry-After beyond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import ApiError


class Limiter:
    def __init__(self, concurrent: int, queue: int, retry_after_s: int = 1) -> None:
        self._sem = asyncio.Semaphore(concurrent)
        self.concurrent = concurrent
        self.queue = queue
        self.waiting = 0
        self.active = 0
        self.retry_after = str(retry_after_s)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a slot; raise 503 at once when the queue is already full."""
        if self._sem.locked() and self.waiting >= self.queue:
            raise ApiError(
                503,
                "busy",
                f"server busy: {self.active} running, {self.waiting} queued",
                {"Retry-After": self.retry_after},
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()

    def free_now(self) -> bool:
        """True when a job could start right now (used to skip optional work such as interim decodes)."""
        return not self._sem.locked()
