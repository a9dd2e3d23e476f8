"""Small WebSocket helpers shared by the services' stream endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import WebSocket
from pydantic import TypeAdapter
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .protocol import ErrorEvent, Event, ProtocolError, parse_event

E = TypeVar("E")


async def receive_frame(ws: WebSocket) -> str | bytes | None:
    """Next text or binary frame; None once the peer is gone."""
    try:
        message = await ws.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    if message["type"] == "websocket.disconnect":
        return None
    if message.get("bytes") is not None:
        return bytes(message["bytes"])
    return str(message.get("text") or "")


async def send_event(ws: WebSocket, event: Event) -> bool:
    """Send one event; False when the peer has gone (callers then stop)."""
    return await send_text(ws, event.dump())


async def send_text(ws: WebSocket, text: str) -> bool:
    """Send one text frame; False when the peer has gone."""
    if ws.application_state != WebSocketState.CONNECTED:
        return False
    try:
        await ws.send_text(text)
    except (WebSocketDisconnect, RuntimeError):
        return False
    return True


async def send_audio(ws: WebSocket, data: bytes) -> bool:
    """Send one binary audio frame; False when the peer has gone."""
    if ws.application_state != WebSocketState.CONNECTED:
        return False
    try:
        await ws.send_bytes(data)
    except (WebSocketDisconnect, RuntimeError):
        return False
    return True


async def send_error(ws: WebSocket, code: str, message: str, service: str | None = None, fatal: bool = False) -> bool:
    return await send_event(ws, ErrorEvent(code=code, message=message, service=service, fatal=fatal))


async def frames(
    ws: WebSocket, adapter: TypeAdapter[E], error: Callable[[str, str], Awaitable[object]]
) -> AsyncIterator[bytes | E]:
    """A connection's frames until the peer goes away: binary frames as bytes, text frames as typed
    events. A text frame that is not a valid event is answered with `error(code, message)` and skipped."""
    while (frame := await receive_frame(ws)) is not None:
        if isinstance(frame, bytes):
            yield frame
            continue
        try:
            yield parse_event(adapter, frame)
        except ProtocolError as exc:
            await error(exc.code, exc.message)
