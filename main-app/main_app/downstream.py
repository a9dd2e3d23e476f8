"""Talking to the four services: WebSocket connections with timeouts, and the LLM token stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from voice_common.chat import trim_history
from voice_common.protocol import (
    ChatMessage,
    ErrorEvent,
    LlmDone,
    LlmRequest,
    ProtocolError,
    Token,
    llm_server_events,
    parse_event,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import WebSocketException

from .settings import AppSettings

logger = logging.getLogger(__name__)
SERVICES = ("vad", "stt", "tts", "llm")


class ServiceError(Exception):
    """A downstream service is down, timed out or answered with an error."""

    def __init__(self, service: str, code: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.code = code
        self.message = message


def service_url(settings: AppSettings, service: str) -> str:
    return str(getattr(settings, f"{service}_url"))


async def connect(settings: AppSettings, service: str) -> ClientConnection:
    url = settings.ws_url(service_url(settings, service))
    try:
        return await websockets.connect(
            url,
            open_timeout=settings.connect_timeout_s,
            close_timeout=1.0,
            max_size=4 * 1024 * 1024,
            ping_interval=20,
            ping_timeout=20,
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise ServiceError(service, "service_unavailable", f"cannot connect to the {service} service: {exc}") from None


CONNECTION_ERRORS = (OSError, TimeoutError, WebSocketException)


async def hang_up(ws: ClientConnection, abort: bool) -> None:
    """Close a service socket. On cancellation, abort: a polite close handshake can wait behind
    megabytes of queued audio, and the service stops its work on the disconnect anyway."""
    if abort:
        ws.transport.abort()
    else:
        await ws.close()


async def llm_tokens(settings: AppSettings, messages: list[ChatMessage]) -> AsyncIterator[str]:
    """Stream reply tokens for a conversation. Leaving the loop early closes the socket, which stops
    generation at the LLM service at once."""
    request = LlmRequest(
        messages=trim_history(messages, settings.history_tokens),
        max_tokens=settings.max_reply_tokens,
        temperature=settings.temperature,
        system_prompt=settings.system_prompt,
    )
    ws = await connect(settings, "llm")
    finished = False
    try:
        await ws.send(request.dump())
        first = True
        while True:
            try:
                async with asyncio.timeout(settings.llm_first_token_timeout_s if first else 60):
                    raw = await ws.recv()
            except TimeoutError:
                raise ServiceError("llm", "timeout", "the language model did not answer in time") from None
            event = parse_event(llm_server_events, raw)
            if isinstance(event, Token):
                first = False
                yield event.text
            elif isinstance(event, LlmDone):
                finished = True
                return
            elif isinstance(event, ErrorEvent):
                raise ServiceError("llm", event.code, event.message)
    except ProtocolError as exc:
        raise ServiceError("llm", "bad_event", f"unexpected event from the LLM service: {exc}") from None
    except CONNECTION_ERRORS as exc:
        raise ServiceError("llm", "service_unavailable", f"lost the LLM service: {exc}") from None
    finally:
        await hang_up(ws, abort=not finished)


async def check_health(settings: AppSettings, client: httpx.AsyncClient) -> dict[str, Any]:
    async def one(service: str) -> tuple[str, dict[str, Any]]:
        try:
            r = await client.get(service_url(settings, service) + "/healthz", timeout=1)
            body = r.json()
            return service, {
                "status": "ok" if r.status_code == 200 else "unavailable",
                **({"reason": body.get("reason")} if r.status_code != 200 else {}),
            }
        except (httpx.HTTPError, ValueError) as exc:
            return service, {"status": "down", "reason": f"{type(exc).__name__}: {exc}"}

    return dict(await asyncio.gather(*(one(s) for s in SERVICES)))
