"""Small WebSocket helpers shared by the services' stream endpoints."""

from __future__ import annotations

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .protocol import ErrorEvent, Event


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
    if ws.application_state != WebSocketState.CONNECTED:
        return False
    try:
        await ws.send_text(event.dump())
    except (WebSocketDisconnect, RuntimeError):
        return False
    return True


async def send_error(ws: WebSocket, code: str, message: str, service: str | None = None, fatal: bool = False) -> bool:
    return await send_event(ws, ErrorEvent(code=code, message=message, service=service, fatal=fatal))
