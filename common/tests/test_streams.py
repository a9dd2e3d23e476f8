"""The stream-handler base and its admission gate, on a small in-process app over real sockets."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
import websockets
from fastapi import FastAPI, WebSocket
from voice_common.app import create_service_app
from voice_common.limits import Limiter
from voice_common.protocol import Cancel, Cancelled, Done, Stop, _adapter
from voice_common.settings import ServiceSettings
from voice_common.streams import ErrorBudget, StreamHandler

from tests.helpers import free_port

pytestmark = pytest.mark.fast
Events = Stop | Cancel


class Slow(StreamHandler[Events]):
    """`stop` starts slow work; `cancel` must overtake it."""

    service = "demo"
    events = _adapter(Events)
    live = 0  # slow work running now, over all connections

    def __init__(self, socket: WebSocket, engine: Any) -> None:
        super().__init__(socket)
        self.work: asyncio.Task[None] | None = None

    async def on_event(self, event: Events) -> None:
        if isinstance(event, Stop):
            self.work = self.spawn(self.slow())
        elif self.work is not None:
            self.work.cancel()
            await self.send(Cancelled())

    async def slow(self) -> None:
        Slow.live += 1
        try:
            await asyncio.sleep(30)
            await self.send(Done())
        finally:
            Slow.live -= 1


async def serve(app: FastAPI) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"ws://127.0.0.1:{port}/ws"
    server.should_exit = True
    await task


@pytest.fixture
async def demo() -> AsyncIterator[tuple[str, threading.Event]]:
    loaded = threading.Event()

    def load() -> object:
        loaded.wait(10)  # the model "loads" until the test says so
        return object()

    app = create_service_app(
        name="demo", settings=ServiceSettings(max_streams=2), load=load, stream=lambda s, e: Slow(s, e)
    )
    async for url in serve(app):
        yield url, loaded
    loaded.set()


async def refusal(url: str) -> tuple[dict[str, Any], int | None]:
    async with websockets.connect(url) as ws:
        event = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        return event, ws.close_code


async def test_streams_wait_for_the_engine_and_are_limited(demo: tuple[str, threading.Event]) -> None:
    url, loaded = demo
    event, code = await refusal(url)
    assert event["code"] == "not_ready" and event["fatal"] and code == 1013
    assert "loading model" in event["message"]
    loaded.set()
    await asyncio.sleep(0.2)
    async with websockets.connect(url), websockets.connect(url):
        event, code = await refusal(url)
        assert event["code"] == "too_many_streams" and event["fatal"] and code == 1013
    await asyncio.sleep(0.1)
    async with websockets.connect(url) as ws:  # a place is free again
        await ws.send(json.dumps({"type": "nope"}))
        assert json.loads(await ws.recv())["code"] == "bad_event"  # a bad event does not end the stream
        await ws.send(b"\x00\x00")
        assert json.loads(await ws.recv())["code"] == "unexpected_audio"


async def test_cancel_overtakes_work_in_progress_and_nothing_outlives_the_socket(
    demo: tuple[str, threading.Event],
) -> None:
    url, loaded = demo
    loaded.set()
    await asyncio.sleep(0.2)
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "stop"}))
        await ws.send(json.dumps({"type": "cancel"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 2))["type"] == "cancelled"
        await ws.send(json.dumps({"type": "stop"}))  # more slow work, then the client leaves
        while Slow.live == 0:
            await asyncio.sleep(0.01)
    for _ in range(100):
        if Slow.live == 0:
            break
        await asyncio.sleep(0.02)
    assert Slow.live == 0


async def test_a_cancelled_caller_does_not_free_the_slot_of_a_running_thread() -> None:
    limiter = Limiter(1, 4)
    release = threading.Event()
    caller = asyncio.create_task(limiter.run_in_thread(release.wait, 10))
    await asyncio.sleep(0.05)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    assert limiter.active == 1 and not limiter.free_now()  # the thread still holds the core
    release.set()
    for _ in range(100):
        if limiter.free_now():
            break
        await asyncio.sleep(0.01)
    assert limiter.active == 0 and limiter.free_now()


async def test_only_this_servers_pages_and_allowed_origins_open_a_stream() -> None:
    settings = ServiceSettings(allowed_origins=["https://app.example"])
    app = create_service_app(name="demo", settings=settings, load=None, engine=object(), stream=lambda s, e: Slow(s, e))
    async for url in serve(app):
        own = url.replace("ws://", "http://").removesuffix("/ws")
        for origin in (None, own, "https://app.example"):  # a non-browser client, the own page, a listed one
            async with websockets.connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                await ws.send(json.dumps({"type": "stop"}))
                await ws.send(json.dumps({"type": "cancel"}))
                assert json.loads(await ws.recv())["type"] == "cancelled"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403


class ShortWindow(Slow):
    def __init__(self, socket: WebSocket, engine: Any) -> None:
        super().__init__(socket, engine)
        self.errors = ErrorBudget(burst=10, window_s=1.0)


async def test_a_flood_of_bad_frames_gets_a_few_errors_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    app = create_service_app(
        name="demo", settings=ServiceSettings(), load=None, engine=object(), stream=lambda s, e: ShortWindow(s, e)
    )
    async for url in serve(app):
        async with websockets.connect(url) as ws:
            for _ in range(500):
                await ws.send("not json")
            await ws.send(json.dumps({"type": "stop"}))
            await ws.send(json.dumps({"type": "cancel"}))
            errors = []
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 5)))["type"] != "cancelled":
                errors.append(event)
            assert len(errors) == 10 and all(e["code"] == "bad_event" for e in errors)  # the stream lives on
            await asyncio.sleep(1.0)  # a later error (next window) says how many were held back
            await ws.send("still not json")
            later = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert "490 more errors held back" in later["message"]
    assert sum("error to the client" in r.message for r in caplog.records) <= 12
