"""Races inside the STT socket, made deterministic with a scripted Transcriber (fault injection: which
decode finishes first is set by the test) over a real socket. No model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import uvicorn
import websockets
from stt_service.app import create_app
from stt_service.engine import RATE, Seg, Superseded, Transcript
from stt_service.settings import SttSettings
from voice_common.audio import float32_to_pcm16

from tests.helpers import free_port

pytestmark = pytest.mark.fast
WORDS = ["one", "two", "three", "four"]


class ScriptedTranscriber:
    """Hears loud blocks as words (block k is at amplitude 0.1 k); decode n takes `delays[n]` s. With
    `stoppable` it gives up when its `stop` event is set, as the real engines do between tokens."""

    name = "scripted"
    multilingual = False

    def __init__(self, delays: list[float], stoppable: bool = False) -> None:
        self.delays = delays
        self.stoppable = stoppable
        self.calls = 0
        self.done = 0
        self.stopped = 0
        self.drafts: list[Transcript | None] = []  # the draft each decode was given

    def transcribe(
        self, audio: np.ndarray, stop: threading.Event | None = None, draft: Transcript | None = None, **_: object
    ) -> Transcript:
        n, self.calls = self.calls, self.calls + 1
        self.drafts.append(draft)
        if self.stoppable and stop is not None and stop.wait(self.delays[n] if n < len(self.delays) else 0.02):
            self.stopped += 1
            raise Superseded
        if not self.stoppable:
            time.sleep(self.delays[n] if n < len(self.delays) else 0.02)
        frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
        level = np.sqrt((frames**2).mean(axis=1))
        segments, start = [], None
        for i, loud in enumerate([*(level > 0.01), False]):
            if loud and start is None:
                start = i
            elif not loud and start is not None:
                word = WORDS[round(float(level[start:i].mean()) / 0.1) - 1]
                segments.append(Seg(start / 100, i / 100, f" {word}"))
                start = None
        self.done += 1
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, "en", 1.0, len(audio) / RATE, segments, self.delays[n] if n < len(self.delays) else 0)


def block(word: int, seconds: float = 1.0) -> np.ndarray:
    return np.full(int(RATE * seconds), 0.1 * word, dtype=np.float32) * np.sign(np.sin(np.arange(int(RATE * seconds))))


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), dtype=np.float32)


@contextlib.asynccontextmanager
async def serving(engine: ScriptedTranscriber) -> AsyncIterator[str]:
    app = create_app(SttSettings(commit_after_s=4.0), engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def stt_url() -> AsyncIterator[tuple[str, ScriptedTranscriber]]:
    engine = ScriptedTranscriber(delays=[0.3, 0.6])  # the first decode finishes first; neither stops early
    async with serving(engine) as url:
        yield url, engine


async def send(ws: websockets.ClientConnection, audio: np.ndarray) -> None:
    """In 20 ms frames, as a microphone sends them (the quiet detection works per frame)."""
    pcm = float32_to_pcm16(audio)
    for i in range(0, len(pcm), 640):
        await ws.send(pcm[i : i + 640])


@pytest.mark.timeout(30)
async def test_a_decode_that_commits_late_never_makes_the_final_repeat_words(stt_url) -> None:
    """Decodes A (of 4.1 s) and B (of 5.6 s) run at once; A finishes first and commits "one two"; B,
    started before that commit, finishes later with "one two three four". B's text repeats the
    committed words: shown or reused as the final, the user would read "one two one two three four"."""
    url, engine = stt_url
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "interim": False}))
        assert json.loads(await ws.recv())["type"] == "ready"
        gap = quiet(0.04)  # too short for an eager decode, long enough to part the words
        first = np.concatenate([block(1, 1.3), gap, block(2, 1.3), gap, block(3, 1.3), quiet(0.1)])
        await send(ws, first)  # the quiet after "three" starts eager decode A
        while engine.calls < 1:
            await asyncio.sleep(0.01)
        await send(ws, np.concatenate([quiet(0.4), block(4), quiet(0.1)]))  # eager decode B
        interim = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert interim["audio_ms"] == 4080  # A, which committed "one two"
        while engine.done < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # B has finished too
        await send(ws, quiet(0.3))
        await ws.send(json.dumps({"type": "stop"}))
        final = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert final["type"] == "final" and final["text"].split() == ["one", "two", "three", "four"], final
    assert engine.calls == 3  # B was stale: what A left uncommitted was decoded again


async def eager_decode_under_way(ws: websockets.ClientConnection, engine: ScriptedTranscriber) -> None:
    """An utterance whose first word is followed by quiet: its eager decode (A) has started."""
    await ws.send(json.dumps({"type": "start", "interim": False}))
    assert json.loads(await ws.recv())["type"] == "ready"
    await send(ws, np.concatenate([block(1), quiet(0.1)]))
    while engine.calls < 1:
        await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
async def test_an_eager_decode_stops_the_decode_it_supersedes() -> None:
    """Eager decode A (slow) is under way when the user pauses again after more words: B covers all A
    covers and more, so A is stopped rather than left to halve B's cores; B is shown and is the final."""
    engine = ScriptedTranscriber(delays=[5.0, 0.2], stoppable=True)
    async with serving(engine) as url, websockets.connect(url) as ws:
        await eager_decode_under_way(ws, engine)
        await send(ws, np.concatenate([quiet(0.2), block(2), quiet(0.1)]))  # eager decode B
        interim = json.loads(await asyncio.wait_for(ws.recv(), 3))  # well before A's 5 s
        assert interim["type"] == "interim" and interim["text"].split() == ["one", "two"], interim
        assert engine.stopped == 1
        await send(ws, quiet(0.2))
        await ws.send(json.dumps({"type": "stop"}))
        final = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert final["type"] == "final" and final["text"].split() == ["one", "two"], final
    assert engine.calls == 2  # the final reused B


@pytest.mark.timeout(30)
async def test_cancel_stops_the_decodes_under_way() -> None:
    """A cancelled utterance's decode is stopped, not left to hold a core nobody is waiting on."""
    engine = ScriptedTranscriber(delays=[5.0], stoppable=True)
    async with serving(engine) as url, websockets.connect(url) as ws:
        await eager_decode_under_way(ws, engine)
        await ws.send(json.dumps({"type": "cancel"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 3))["type"] == "cancelled"
        for _ in range(200):  # well before A's 5 s
            if engine.stopped:
                break
            await asyncio.sleep(0.01)
    assert engine.stopped == 1


@pytest.mark.timeout(30)
async def test_each_decode_is_drafted_by_the_widest_one_before_it() -> None:
    """The final is drafted by the eager decode that covered the most of the utterance (the engine checks
    those tokens instead of generating them again); the first decode of an utterance has no draft."""
    engine = ScriptedTranscriber(delays=[0.05, 0.05])
    async with serving(engine) as url, websockets.connect(url) as ws:
        await eager_decode_under_way(ws, engine)
        first = json.loads(await asyncio.wait_for(ws.recv(), 3))
        await send(ws, np.concatenate([quiet(0.2), block(2)]))  # more words, no pause: the final decodes
        await ws.send(json.dumps({"type": "stop"}))
        final = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "interim" and final["type"] == "final" and final["text"].split() == ["one", "two"]
    assert engine.calls == 2 and engine.drafts[0] is None
    draft = engine.drafts[1]
    assert draft is not None and draft.text == "one" and round(draft.duration * 1000) == first["audio_ms"]
