"""WebSocket streaming: text in pieces as an LLM produces it, audio out sentence by sentence.

Two tasks per connection: the reader splits incoming text into sentences and queues them; the speaker
synthesizes each sentence in a worker thread and sends its PCM in `chunk_ms` frames. `cancel` bumps a
generation counter and empties the queue, so stale audio is never sent (checked before every frame).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, WebSocket
from voice_common.audio import AudioFormat, float32_to_pcm16, resample
from voice_common.errors import ApiError
from voice_common.protocol import (
    AudioStart,
    Cancel,
    Cancelled,
    Done,
    Flush,
    SentenceEnd,
    SentenceStart,
    Stop,
    TtsStart,
    TtsText,
    tts_client_events,
)
from voice_common.tasks import run_until_first_done
from voice_common.text import SentenceSplitter
from voice_common.ws import frames, send_error, send_event

from .engine import Synthesizer
from .settings import TtsSettings

logger = logging.getLogger(__name__)
SERVICE = "tts"
_END = object()  # queued after the last sentence of a stopped stream


@dataclass
class Stream:
    voice: str
    rate: int
    speed: float
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    generation: int = 0
    index: int = 0


async def serve_stream(socket: WebSocket, app: FastAPI, settings: TtsSettings) -> None:
    await socket.accept()
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue(maxsize=256)
    state: dict[str, Stream | None] = {"stream": None}
    generation = 0

    async def speaker(engine: Synthesizer) -> None:
        while True:
            gen, item = await queue.get()
            stream = state["stream"]
            if gen != generation or stream is None:
                continue
            if item is _END:
                await send_event(socket, Done())
                continue
            text = str(item)
            stream.index += 1
            idx = stream.index
            await send_event(socket, SentenceStart(index=idx, text=text))
            src = engine.voices[stream.voice].sample_rate
            try:
                with app.state.synth_seconds.time():
                    parts = await asyncio.to_thread(engine.synthesize, text, stream.voice, stream.speed)
            except Exception as exc:  # one bad sentence must not end the stream
                logger.exception("synthesis failed")
                await send_error(socket, "synthesis_failed", f"{type(exc).__name__}: {exc}", SERVICE)
                continue
            samples = 0
            step = int(stream.rate * settings.chunk_ms / 1000) * 2
            for part in parts:
                pcm = float32_to_pcm16(resample(part, src, stream.rate))
                for i in range(0, len(pcm), step):
                    if gen != generation:
                        break  # cancelled: stop within one chunk
                    await socket.send_bytes(pcm[i : i + step])
                    samples += len(pcm[i : i + step]) // 2
            if gen == generation:
                await send_event(socket, SentenceEnd(index=idx, audio_ms=round(samples * 1000 / stream.rate, 1)))

    async def enqueue(pieces: list[str]) -> None:
        for piece in pieces:
            await queue.put((generation, piece))

    async def reader(engine: Synthesizer) -> None:
        nonlocal generation
        async for event in frames(socket, tts_client_events, SERVICE):
            if isinstance(event, bytes):
                await send_error(socket, "unexpected_audio", "this socket takes text events only", SERVICE)
                continue
            stream = state["stream"]
            if isinstance(event, TtsStart):
                try:
                    voice = engine.resolve(event.voice)
                except ApiError as exc:
                    await send_error(socket, exc.code, exc.message, SERVICE)
                    continue
                generation += 1
                rate = event.sample_rate or settings.sample_rate or engine.voices[voice].sample_rate
                state["stream"] = Stream(voice, rate, event.speed)
                await send_event(socket, AudioStart(format=AudioFormat(rate=rate, width=2, channels=1), voice=voice))
            elif stream is None:
                await send_error(socket, "no_stream", "send a start event first", SERVICE)
            elif isinstance(event, TtsText):
                if len(stream.splitter.buf) + len(event.text) > settings.max_chars:
                    await send_error(socket, "text_too_long", f"pending text over {settings.max_chars} chars", SERVICE)
                    continue
                await enqueue(stream.splitter.push(event.text))
            elif isinstance(event, Flush):
                await enqueue(stream.splitter.flush())
            elif isinstance(event, Stop):
                await enqueue(stream.splitter.flush())
                await queue.put((generation, _END))
            elif isinstance(event, Cancel):
                generation += 1  # overtakes everything queued and the sentence being spoken
                while not queue.empty():
                    queue.get_nowait()
                stream.splitter = SentenceSplitter()
                await send_event(socket, Cancelled())

    try:
        engine: Synthesizer = app.state.slot.get()
    except ApiError as exc:
        await send_error(socket, exc.code, exc.message, SERVICE, fatal=True)
        await socket.close(1013)
        return
    await run_until_first_done(reader(engine), speaker(engine))
