"""Bounded concurrency with priorities: N jobs at once, a bounded queue behind them, 503 + Retry-After beyond.

The scheduling policy, the same in every engine: when a slot frees, the waiting job with the lowest
`priority` number starts; equal priorities start first-come-first-served. A priority is what the
listener is waiting for, expressed in seconds of slack:

- 0 (`URGENT`): nothing to hear until this job ends — a final transcript, a reply's first TTS fragment,
  a reply's generation;
- the seconds of audio the listener still has queued — a later TTS fragment of a reply that is playing
  (one with 0.3 s in hand goes before one with 4 s);
- `BACKGROUND`: work nobody waits for yet — interim transcripts, speculative replies.

A running job is never pre-empted: the queue only decides who goes next.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .errors import ApiError

R = TypeVar("R")
URGENT = 0.0
BACKGROUND = 1000.0


class Limiter:
    def __init__(self, concurrent: int, queue: int, retry_after_s: int = 1) -> None:
        self.concurrent = concurrent
        self.queue = queue
        self.active = 0
        self.retry_after = str(retry_after_s)
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    async def _acquire(self, priority: float) -> None:
        if self.active < self.concurrent and not self.waiting:
            self.active += 1
            return
        if self.waiting >= self.queue:
            raise ApiError(
                503,
                "busy",
                f"server busy: {self.active} running, {self.waiting} queued",
                {"Retry-After": self.retry_after},
            )
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted just as the waiter was cancelled: pass the slot on
            raise

    def _release(self) -> None:
        self.active -= 1
        while self._waiters and self.active < self.concurrent:
            *_, granted = heapq.heappop(self._waiters)
            if not granted.done():
                self.active += 1
                granted.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: float = URGENT) -> AsyncIterator[None]:
        """Wait for a slot (the most urgent waiter first); raise 503 at once when the queue is full."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def run_in_thread(self, fn: Callable[..., R], /, *args: Any, priority: float = URGENT, **kwargs: Any) -> R:
        """Blocking work in a worker thread under a slot. A cancelled caller returns at once, but the
        slot stays taken until the thread really ends: the limit counts busy cores, not callers."""
        await self._acquire(priority)
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
        return self.active < self.concurrent and not self.waiting

    @property
    def alone(self) -> bool:
        """At most one job running and none waiting: it may use every core (tts_service.engine.Scheduler)."""
        return self.active <= 1 and not self.waiting
