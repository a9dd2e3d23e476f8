"""Everything main-app sends to the browser goes through one Outbox: events, reply audio, and one
error per outage (not one per frame)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from voice_common.protocol import ErrorEvent, Event, ServiceStatus


class Outbox:
    def __init__(
        self, send_event: Callable[[Event], Awaitable[bool]], send_audio: Callable[[bytes], Awaitable[bool]]
    ) -> None:
        self._send_event = send_event
        self._send_audio = send_audio
        self.closed = False  # the browser has gone: nothing more is sent
        self.down: set[str] = set()

    async def send(self, event: Event) -> None:
        if not self.closed and not await self._send_event(event):
            self.closed = True

    async def audio(self, frame: bytes) -> None:
        if not self.closed and not await self._send_audio(frame):
            self.closed = True

    async def error(self, service: str, code: str, message: str, fatal: bool = False) -> None:
        await self.send(ErrorEvent(service=service, code=code, message=message, fatal=fatal))

    async def service_down(self, service: str, message: str) -> None:
        if service not in self.down:
            self.down.add(service)
            await self.error(service, "service_unavailable", message)
            await self.send(ServiceStatus(service=service, status="down"))

    async def service_up(self, service: str) -> None:
        if service in self.down:
            self.down.discard(service)
            await self.send(ServiceStatus(service=service, status="ok"))
