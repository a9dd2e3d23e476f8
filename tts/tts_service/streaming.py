"""WebSocket streaming: text in pieces as an LLM produces it, audio out sentence by sentence.

The reader never waits: text is split into sentences and queued (bounded by `TTS_MAX_CHARS` of pending
text, beyond which the piece is refused with an error), and a speaker task synthesizes each sentence in
a worker thread and sends its PCM in `chunk_ms` frames. Each sentence waits its turn in the service's
`Scheduler` with the audio its listener still has in hand as priority: a reply's first piece goes
before another reply's later sentences. `cancel` empties the queue and cancels the
speaker, so it overtakes everything queued and the sentence being spoken: no stale frame follows
`cancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from fastapi import WebSocket
from voice_common.audio import AudioFormat, float32_to_pcm16, resample
from voice_common.errors import ApiError
from voice_common.limits import URGENT
from voice_common.protocol import (
    AudioStart,
    Cancel,
    Cancelled,
    Done,
    Flush,
    SentenceEnd,
    SentenceStart,
    Stop,
    TtsClientEvent,
    TtsStart,
    TtsText,
    tts_client_events,
)
from voice_common.streams import StreamHandler

from .engine import Scheduler, Synthesizer
from .settings import TtsSettings
from .text import SentenceSplitter

logger = logging.getLogger(__name__)
SERVICE = "tts"
END = None  # queued after the last sentence of a stopped stream


@dataclass
class Voice:
    name: str
    rate: int
    speed: float
    splitter: SentenceSplitter
    index: int = 0
    first_audio: float | None = None  # monotonic time of the first frame sent
    sent_s: float = 0.0  # audio sent so far

    def in_hand(self) -> float:
        """Seconds of audio the listener has left to play, assuming play-out from the first frame on: the
        scheduling priority of this stream's next sentence (0 = the listener is waiting)."""
        if self.first_audio is None:
            return URGENT
        return max(URGENT, self.sent_s - (time.monotonic() - self.first_audio))


class TtsStream(StreamHandler[TtsClientEvent]):
    service = SERVICE
    events = tts_client_events

    def __init__(self, socket: WebSocket, engine: Synthesizer, settings: TtsSettings, scheduler: Scheduler):
        super().__init__(socket)
        self.engine = engine
        self.settings = settings
        self.scheduler = scheduler
        self.voice: Voice | None = None
        self.queue: deque[str | None] = deque()
        self.speaker: asyncio.Task[None] | None = None

    def pending_chars(self) -> int:
        buffered = len(self.voice.splitter.buf) if self.voice else 0
        return buffered + sum(len(s) for s in self.queue if s is not END)

    def new_splitter(self) -> SentenceSplitter:
        return SentenceSplitter(first_words=self.settings.first_words)

    def running_dry(self, voice: Voice) -> bool:
        """The listener will run out of audio before this sentence ends: nothing queued or being
        synthesised, and less than `low_water_ms` left to play (a long sentence takes the LLM ~1 s to
        write and piper ~1 s to speak here: waiting for its end would leave a gap)."""
        idle = not self.queue and (self.speaker is None or self.speaker.done())
        return idle and voice.first_audio is not None and voice.in_hand() < self.settings.low_water_ms / 1000

    def enqueue(self, items: list[str | None]) -> None:
        self.queue.extend(items)
        if items and (self.speaker is None or self.speaker.done()):
            self.speaker = self.spawn(self.speak())

    def drop_queued(self) -> None:
        self.queue.clear()
        if self.speaker is not None:
            self.speaker.cancel()
            self.speaker = None

    async def on_audio(self, frame: bytes) -> None:
        await self.error("unexpected_audio", "this socket takes text events only")

    async def on_event(self, event: TtsClientEvent) -> None:
        if isinstance(event, TtsStart):
            try:
                name = self.engine.resolve(event.voice)
            except ApiError as exc:
                await self.error(exc.code, exc.message)
                return
            self.drop_queued()
            rate = event.sample_rate or self.settings.sample_rate or self.engine.voices[name].sample_rate
            self.voice = Voice(name, rate, event.speed, self.new_splitter())
            await self.send(AudioStart(format=AudioFormat(rate=rate), voice=name))
        elif self.voice is None:
            await self.error("no_stream", "send a start event first")
        elif isinstance(event, TtsText):
            if self.pending_chars() + len(event.text) > self.settings.max_chars:
                await self.error("text_too_long", f"pending text over {self.settings.max_chars} chars")
                return
            pieces = self.voice.splitter.push(event.text)
            if not pieces and self.running_dry(self.voice):
                pieces = [p] if (p := self.voice.splitter.take_words(2 * self.settings.first_words)) else []
            self.enqueue(list(pieces))
        elif isinstance(event, Flush):
            self.enqueue(list(self.voice.splitter.flush()))
        elif isinstance(event, Stop):
            self.enqueue([*self.voice.splitter.flush(), END])
        elif isinstance(event, Cancel):
            self.drop_queued()
            self.voice.splitter = self.new_splitter()
            await self.send(Cancelled())

    async def speak(self) -> None:
        """Speak queued sentences until the queue is empty; cancelled by `cancel` or the disconnect."""
        while self.queue and self.voice is not None:
            text = self.queue.popleft()
            if text is END:
                await self.send(Done())
            else:
                await self.speak_sentence(self.voice, text)

    async def speak_sentence(self, voice: Voice, text: str) -> None:
        voice.index += 1
        index = voice.index
        await self.send(SentenceStart(index=index, text=text))
        t0 = time.monotonic()
        try:
            parts = await self.scheduler.synthesize(self.engine, text, voice.name, voice.speed, voice.in_hand())
        except ApiError as exc:  # busy: this sentence is lost, the stream goes on
            await self.error(exc.code, exc.message)
            return
        except Exception as exc:  # one bad sentence must not end the stream
            logger.exception("synthesis failed")
            await self.error("synthesis_failed", f"{type(exc).__name__}: {exc}")
            return
        logger.debug("sentence %d (%d chars) ready in %.0f ms", index, len(text), (time.monotonic() - t0) * 1000)
        src = self.engine.voices[voice.name].sample_rate
        step = int(voice.rate * self.settings.chunk_ms / 1000) * 2
        samples = 0
        if voice.first_audio is None:
            voice.first_audio = time.monotonic()
        for part in parts:
            pcm = float32_to_pcm16(resample(part, src, voice.rate))
            for i in range(0, len(pcm), step):
                if not await self.send_audio(pcm[i : i + step]):
                    return
                samples += len(pcm[i : i + step]) // 2
        voice.sent_s += samples / voice.rate
        await self.send(SentenceEnd(index=index, audio_ms=round(samples * 1000 / voice.rate, 1)))
