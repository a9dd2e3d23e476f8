"""What main-app needs from the four services, as small Protocols, and their WebSocket implementation.

The session, speech input and replies depend only on `Services`; the app injects `WsServices`, and the
orchestration tests inject in-process fakes with scripted events and timing (main-app/tests/fakes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Generic, Protocol, TypeVar

import httpx
import websockets
from pydantic import TypeAdapter
from voice_common.protocol import (
    AudioStart,
    ErrorEvent,
    Event,
    LlmDone,
    LlmRequest,
    LlmServerEvent,
    ProtocolError,
    SttServerEvent,
    Token,
    TtsServerEvent,
    TtsStart,
    VadReady,
    VadServerEvent,
    VadStart,
    llm_server_events,
    parse_event,
    stt_server_events,
    tts_server_events,
    vad_server_events,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import WebSocketException

from .settings import AppSettings

logger = logging.getLogger(__name__)
SERVICES = ("vad", "stt", "tts", "llm")
CONNECTION_ERRORS = (OSError, TimeoutError, WebSocketException)
E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)
ADMISSION_WAIT_S = 0.3  # a refusal comes right after the handshake; local or LAN round trips are far shorter


class ServiceError(Exception):
    """A downstream service is down, timed out or answered with an error."""

    def __init__(self, service: str, code: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.code = code
        self.message = message


class EventStream(Protocol[E_co]):
    """An open stream to one service: events and audio out, its typed events and audio in."""

    async def send(self, item: Event | bytes) -> None:
        """Raises ServiceError when the stream is lost."""

    def __aiter__(self) -> AsyncIterator[E_co | bytes]:
        """What the service sends; ends when it closes the stream, ServiceError when the stream is lost."""
        ...

    async def close(self, abort: bool = False) -> None:
        """`abort` drops the connection at once instead of a polite close (which can wait behind
        queued audio); the service stops its work on the disconnect either way."""


class Services(Protocol):
    async def vad(self, start: VadStart) -> EventStream[VadServerEvent]:
        """A session-long voice-detection stream, started and ready."""
        ...

    async def stt(self) -> EventStream[SttServerEvent]:
        """A session-long recognition stream; utterances are started on it."""
        ...

    async def tts(self, start: TtsStart) -> EventStream[TtsServerEvent]:
        """One reply's synthesis stream, started (its `audio_start` received)."""
        ...

    def llm(self, request: LlmRequest) -> AsyncIterator[str]:
        """One reply's tokens; leaving the loop early stops the generation."""
        ...


class WsStream(Generic[E]):
    def __init__(self, ws: ClientConnection, events: TypeAdapter[E], service: str) -> None:
        self.ws = ws
        self.events = events
        self.service = service
        self.early: list[str | bytes] = []  # frames read by `admitted`, still to be handed out

    def lost(self, exc: BaseException) -> ServiceError:
        return ServiceError(self.service, "service_unavailable", f"lost the {self.service} service: {exc}")

    async def send(self, item: Event | bytes) -> None:
        try:
            await self.ws.send(item if isinstance(item, bytes) else item.dump())
        except CONNECTION_ERRORS as exc:
            raise self.lost(exc) from None

    async def admitted(self, wait_s: float) -> None:
        """A service that refuses a stream (busy, loading) says so right after the handshake. A stream
        with no start event of its own (STT's) waits `wait_s` for that refusal, so a refused link is
        reported as refused instead of up-then-down."""
        try:
            async with asyncio.timeout(wait_s):
                raw = await self.ws.recv()  # cancelling recv() loses nothing (websockets' guarantee)
        except TimeoutError:
            return
        except CONNECTION_ERRORS as exc:
            raise self.lost(exc) from None
        if isinstance(raw, str):
            with contextlib.suppress(ProtocolError):
                if isinstance(event := parse_event(self.events, raw), ErrorEvent) and event.fatal:
                    raise ServiceError(self.service, event.code, event.message)
        self.early.append(raw)

    async def __aiter__(self) -> AsyncIterator[E | bytes]:
        try:
            async for raw in _chain(self.early, self.ws):
                if isinstance(raw, bytes):
                    yield raw
                    continue
                try:
                    yield parse_event(self.events, raw)
                except ProtocolError as exc:  # e.g. a newer service's event: skip it
                    logger.warning("unexpected %s event: %s", self.service, exc)
        except CONNECTION_ERRORS as exc:
            raise self.lost(exc) from None

    async def first(self, wait_s: float) -> E:
        """The service's answer to a start event; an error event becomes a ServiceError."""
        try:
            async with asyncio.timeout(wait_s):
                event = parse_event(self.events, await self.ws.recv())
        except TimeoutError:
            raise ServiceError(self.service, "timeout", f"the {self.service} service did not answer") from None
        except ProtocolError as exc:
            raise ServiceError(self.service, "bad_event", exc.message) from None
        except CONNECTION_ERRORS as exc:
            raise self.lost(exc) from None
        if isinstance(event, ErrorEvent):
            raise ServiceError(self.service, event.code, event.message)
        return event

    async def close(self, abort: bool = False) -> None:
        if abort:
            self.ws.transport.abort()
        else:
            await self.ws.close()


async def _chain(first: list[str | bytes], rest: ClientConnection) -> AsyncIterator[str | bytes]:
    while first:
        yield first.pop(0)
    async for raw in rest:
        yield raw


class WsServices:
    """The four services over their WebSockets, at the URLs of the settings."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings

    async def connect(self, service: str, events: TypeAdapter[E]) -> WsStream[E]:
        url = self.settings.ws_url(service_url(self.settings, service))
        try:
            ws = await websockets.connect(
                url,
                additional_headers=self.settings.downstream_headers,
                open_timeout=self.settings.connect_timeout_s,
                close_timeout=1.0,
                max_size=4 * 1024 * 1024,
                ping_interval=20,
                ping_timeout=20,
            )
        except CONNECTION_ERRORS as exc:
            raise ServiceError(
                service, "service_unavailable", f"cannot connect to the {service} service: {exc}"
            ) from None
        return WsStream(ws, events, service)

    async def started(self, service: str, events: TypeAdapter[E], start: Event, ready: type) -> WsStream[E]:
        """Connect, send the start event and wait for the service's answer to it."""
        stream = await self.connect(service, events)
        try:
            await stream.send(start)
            answer = await stream.first(self.settings.connect_timeout_s)
            if not isinstance(answer, ready):
                raise ServiceError(service, "bad_event", f"expected {ready.__name__}, got {type(answer).__name__}")
        except BaseException:
            await stream.close(abort=True)
            raise
        return stream

    async def vad(self, start: VadStart) -> WsStream[VadServerEvent]:
        return await self.started("vad", vad_server_events, start, VadReady)

    async def stt(self) -> WsStream[SttServerEvent]:
        stream = await self.connect("stt", stt_server_events)
        try:
            await stream.admitted(ADMISSION_WAIT_S)
        except BaseException:
            await stream.close(abort=True)
            raise
        return stream

    async def tts(self, start: TtsStart) -> WsStream[TtsServerEvent]:
        return await self.started("tts", tts_server_events, start, AudioStart)

    async def llm(self, request: LlmRequest) -> AsyncIterator[str]:
        stream: WsStream[LlmServerEvent] = await self.connect("llm", llm_server_events)
        finished = False
        try:
            await stream.send(request)
            events = aiter(stream)
            timeout = self.settings.llm_first_token_timeout_s
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        event = await anext(events)
                except TimeoutError:
                    raise ServiceError("llm", "timeout", "the language model did not answer in time") from None
                except StopAsyncIteration:
                    raise ServiceError("llm", "service_unavailable", "the LLM service closed the stream") from None
                if isinstance(event, Token):
                    timeout = 60
                    yield event.text
                elif isinstance(event, LlmDone):
                    finished = True
                    return
                elif isinstance(event, ErrorEvent):
                    raise ServiceError("llm", event.code, event.message)
        finally:
            await stream.close(abort=not finished)


def service_url(settings: AppSettings, service: str) -> str:
    return str(getattr(settings, f"{service}_url"))


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
