"""One shape for every WebSocket stream: admission, a task group per connection, typed events.

Like wyoming's `AsyncEventHandler`: a subclass says what to do with one event or one audio frame.
The reader hands each frame over at once, so handlers must not wait on slow work: they `spawn` it.
That is what lets a `cancel` overtake anything queued or in progress, and every spawned task ends
with the connection, so nothing outlives a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import WebSocket
from prometheus_client import CollectorRegistry, Gauge
from pydantic import TypeAdapter

from .protocol import ErrorEvent, Event
from .ws import frames, send_audio, send_error, send_event

logger = logging.getLogger(__name__)
E = TypeVar("E")
T = TypeVar("T")


class ErrorBudget:
    """A peer that sends garbage in a loop must not get (or log) one error per frame: the first `burst`
    errors of each `window_s` go out, the rest are counted and the count rides on the next one sent."""

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self.window_start = -window_s
        self.sent = 0
        self.suppressed = 0

    def take(self) -> tuple[bool, int]:
        """(may this error go out, how many were suppressed before it)."""
        now = time.monotonic()
        if now - self.window_start >= self.window_s:
            self.window_start, self.sent = now, 0
        if self.sent >= self.burst:
            self.suppressed += 1
            return False, 0
        self.sent += 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


class StreamHandler(Generic[E]):
    """One connection. Subclasses set `service` and `events` (the typed client events) and override
    `on_event`, and `on_audio` where the socket takes audio."""

    service: ClassVar[str]
    events: ClassVar[TypeAdapter[Any]]
    subprotocol: ClassVar[str | None] = None  # accepted when the client offers it (browsers require that)

    def __init__(self, socket: WebSocket) -> None:
        self.socket = socket
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors = ErrorBudget()

    async def on_event(self, event: E) -> None:
        raise NotImplementedError

    async def on_audio(self, frame: bytes) -> None:
        await self.error("unexpected_audio", "this socket takes JSON events only")

    async def on_close(self) -> None:
        """Called once the peer has gone and every spawned task has ended."""

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run work beside the reader; cancelled and awaited when the connection ends. A failure is
        logged and reported as an error event: it ends that work, not the connection."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%s stream task failed", self.service, exc_info=exc)
            self.spawn(self._report(exc))

    async def _report(self, exc: BaseException) -> None:
        await self.error("internal_error", f"{type(exc).__name__}: {exc}")

    async def send(self, event: Event) -> bool:
        if isinstance(event, ErrorEvent) and not event.fatal:
            allowed, suppressed = self.errors.take()
            if not allowed:
                if self.errors.suppressed == 1:
                    logger.warning("%s: too many errors on one connection; holding the rest back", self.service)
                return True
            if suppressed:
                event = event.model_copy(update={"message": f"{event.message} ({suppressed} more errors held back)"})
            logger.warning("%s error to the client: %s: %s", event.service or self.service, event.code, event.message)
        return await self.deliver(event)

    async def deliver(self, event: Event) -> bool:
        """Put one event on the wire; a handler that speaks another protocol translates it here."""
        return await send_event(self.socket, event)

    async def send_audio(self, frame: bytes) -> bool:
        return await send_audio(self.socket, frame)

    async def error(self, code: str, message: str, fatal: bool = False) -> bool:
        return await self.send(ErrorEvent(code=code, message=message, service=self.service, fatal=fatal))

    async def close(self) -> None:
        """End the connection from this side; the reader then stops and `on_close` runs."""
        await self.socket.close()

    async def run(self) -> None:
        try:
            async for item in frames(self.socket, self.events, self.error):
                if isinstance(item, bytes):
                    await self.on_audio(item)
                else:
                    await self.on_event(item)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.on_close()


class StreamGate(Generic[T]):
    """Admission to a service's stream socket, the same for every service: while the engine is not
    ready, and beyond `max_streams` open streams, the socket gets one fatal `error` event
    (`not_ready` or `too_many_streams`) and is closed with 1013, "try again later"."""

    def __init__(
        self,
        service: str,
        engine: Callable[[], T | None],
        reason: Callable[[], str],
        max_streams: int,
        registry: CollectorRegistry,
    ) -> None:
        self.service = service
        self.engine = engine
        self.reason = reason
        self.max_streams = max_streams
        self.active = 0
        self.gauge = Gauge("websocket_streams", "open WebSocket streams", registry=registry)

    async def serve(self, socket: WebSocket, handler: Callable[[WebSocket, T], StreamHandler[Any]]) -> None:
        wanted = getattr(handler, "subprotocol", None)
        offered = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",")]
        await socket.accept(subprotocol=wanted if wanted in offered else None)
        engine = self.engine()
        if engine is None:
            await self._refuse(socket, "not_ready", f"service not ready: {self.reason()}")
        elif self.active >= self.max_streams:
            await self._refuse(socket, "too_many_streams", f"limit of {self.max_streams} streams reached")
        else:
            self.active += 1
            self.gauge.inc()
            try:
                await handler(socket, engine).run()
            finally:
                self.active -= 1
                self.gauge.dec()

    async def _refuse(self, socket: WebSocket, code: str, message: str) -> None:
        logger.warning("%s stream refused: %s", self.service, message)
        await send_error(socket, code, message + "; try again later", self.service, fatal=True)
        await socket.close(1013)
