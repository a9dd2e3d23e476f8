"""A Python client for main-app's browser protocol: streams audio like a browser would and records
every event with its arrival time. Used by the end-to-end tests and the latency benchmark."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection


@dataclass
class Received:
    t: float
    event: dict[str, Any]


@dataclass
class Playout:
    """A real-time player of one reply's audio: what it has played by now, and how long it sat silent
    waiting for the next frame once it had started (the gaps a listener hears)."""

    rate: int
    total_ms: float = 0.0
    ends_at: float = 0.0  # monotonic time the audio received so far will have played out
    gaps_ms: float = 0.0

    def add(self, nbytes: int, now: float) -> None:
        if self.total_ms and now > self.ends_at:
            self.gaps_ms += (now - self.ends_at) * 1000
        seconds = nbytes / 2 / self.rate
        self.ends_at = max(self.ends_at, now) + seconds
        self.total_ms += seconds * 1000

    def played_ms(self, now: float) -> float:
        return self.total_ms - max(0.0, self.ends_at - now) * 1000


@dataclass
class VoiceClient:
    url: str
    events: list[Received] = field(default_factory=list)
    audio: dict[int, bytearray] = field(default_factory=dict)
    first_audio_at: dict[int, float] = field(default_factory=dict)
    playouts: dict[int, Playout] = field(default_factory=dict)
    ws: ClientConnection | None = None
    conversation_id: str | None = None
    owner_token: str | None = None  # the secret that makes conversations this client's (main_app.owner)
    output_rate: int = 22050
    _turn: int | None = None
    _reader: asyncio.Task[None] | None = None
    _reporter: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(
        self, conversation_id: str | None = None, speak: bool = True, rate: int = 16000
    ) -> dict[str, Any]:
        headers = {"X-Owner-Token": self.owner_token} if self.owner_token else None
        self.ws = await websockets.connect(self.url, max_size=8 * 1024 * 1024, additional_headers=headers)
        await self.ws.send(
            json.dumps({"type": "start", "format": {"rate": rate}, "conversation_id": conversation_id, "speak": speak})
        )
        ready = json.loads(await self.ws.recv())
        if ready["type"] != "ready":
            raise RuntimeError(f"session not ready: {ready}")
        self.conversation_id = ready["conversation_id"]
        self.output_rate = ready["output_format"]["rate"]
        self._reader = asyncio.create_task(self._read())
        self._reporter = asyncio.create_task(self._report_playback())
        return dict(ready)

    async def _report_playback(self) -> None:
        """Tell the server how much of the current reply a real-time player has played, as a browser does."""
        while True:
            await asyncio.sleep(0.15)
            if self._turn is not None and self.ws is not None:
                await self.ws.send(
                    json.dumps({"type": "playback", "turn": self._turn, "played_ms": round(self.played_ms(self._turn))})
                )

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            now = time.monotonic()
            if isinstance(msg, bytes):
                if self._turn is not None:
                    self.audio.setdefault(self._turn, bytearray()).extend(msg)
                    self.first_audio_at.setdefault(self._turn, now)
                    self.playouts.setdefault(self._turn, Playout(self.output_rate)).add(len(msg), now)
                continue
            event = json.loads(msg)
            if event["type"] == "audio_start":
                self._turn = event["turn"]
            elif event["type"] == "interrupted":
                played = self.played_ms(event["turn"])
                self._turn = None
                await self.ws.send(json.dumps({"type": "playback", "turn": event["turn"], "played_ms": round(played)}))
            self.events.append(Received(now, event))
            self._changed.set()

    def played_ms(self, turn: int) -> float:
        """What a real-time player would have played of `turn` by now."""
        playout = self.playouts.get(turn)
        return playout.played_ms(time.monotonic()) if playout else 0.0

    async def send(self, event: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(event))

    async def stream(self, pcm: bytes, rate: int = 16000, frame_ms: int = 20, realtime: bool = True) -> float:
        """Send PCM16 mono frames paced like a microphone; returns the monotonic time the audio ended."""
        assert self.ws is not None
        step = rate * frame_ms // 1000 * 2
        t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            await self.ws.send(pcm[i : i + step])
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (i + step) / 2 / rate - time.monotonic()))
        return time.monotonic()

    def of_type(self, kind: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [r.event for r in self.events if r.event["type"] == kind and r.t >= after]

    async def wait_for(self, kind: str, within: float = 60.0, after: float = 0.0, **match: Any) -> Received:
        deadline = time.monotonic() + within
        while True:
            for r in self.events:
                if r.t >= after and r.event["type"] == kind and all(r.event.get(k) == v for k, v in match.items()):
                    return r
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {kind} event {match} in {within} s; got {[r.event['type'] for r in self.events]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        for task in (self._reader, self._reporter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
