"""Bounded concurrency: N jobs at once, a bounded queue behind them, 503 + Retry-After beyond."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .errors import ApiError

R = TypeVar("R")


class Limiter:
    def __init__(self, concurrent: int, queue: int, retry_after_s: int = 1) -> None:
        self._sem = asyncio.Semaphore(concurrent)
        self.concurrent = concurrent
        self.queue = queue
        self.waiting = 0
        self.active = 0
        self.retry_after = str(retry_after_s)

    async def _acquire(self) -> None:
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

    def _release(self) -> None:
        self.active -= 1
        self._sem.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a slot; raise 503 at once when the queue is already full."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def run_in_thread(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Blocking work in a worker thread under a slot. A cancelled caller returns at once, but the
        slot stays taken until the thread really ends: the limit counts busy cores, not callers."""
        await self._acquire()
        try:
            context = contextvars.copy_context()
            future = asyncio.get_running_loop().run_in_executor(None, lambda: context.run(fn, *args, **kwargs))
        except BaseException:
            self._release()
            raise

        def finished(f: asyncio.Future[R]) -> None:
            self._release()
            if not f.cancelled():
                f.exception()  # retrieved, so an abandoned failure is not logged as "never retrieved"

        future.add_done_callback(finished)
        return await asyncio.shield(future)

    def free_now(self) -> bool:
        """True when a job could start right now (used to skip optional work such as interim decodes)."""
        return not self._sem.locked()
