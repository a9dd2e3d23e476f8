"""In-process fakes of the four services, implementing main-app's `Services` Protocol.

They speak the same typed events as the real services, with scripted content, controllable timing and
fault injection (a service down, a stream lost, an STT that never answers), so the orchestration tests
run in seconds without models or subprocesses. The real services are tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from main_app.services import ServiceError
from voice_common.protocol import (
    AudioStart,
    Cancel,
    Cancelled,
    Done,
    Event,
    Final,
    LlmRequest,
    SentenceEnd,
    SentenceStart,
    Stop,
    SttReady,
    SttStart,
    TtsStart,
    TtsText,
    VadConfigure,
    VadStart,
)

E = TypeVar("E")


class FakeStream(Generic[E]):
    """What main-app sends is recorded in `sent` (and handed to `on_send`); what the service would
    send is `push`ed. `end()` closes it from the service's side, `lose()` breaks it."""

    def __init__(self, service: str, on_send: Callable[[Event | bytes], Awaitable[None]] | None = None) -> None:
        self.service = service
        self.on_send = on_send
        self.sent: list[Event | bytes] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False
        self.aborted = False

    async def send(self, item: Event | bytes) -> None:
        if self.closed:
            raise ServiceError(self.service, "service_unavailable", "stream closed")
        self.sent.append(item)
        if self.on_send is not None:
            await self.on_send(item)

    def push(self, item: E | bytes) -> None:
        self.queue.put_nowait(item)

    def end(self) -> None:
        self.queue.put_nowait(None)

    def lose(self) -> None:
        self.closed = True
        self.queue.put_nowait(ServiceError(self.service, "service_unavailable", "connection lost"))

    async def __aiter__(self) -> AsyncIterator[E | bytes]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self, abort: bool = False) -> None:
        self.closed = True
        self.aborted = abort

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.sent if isinstance(e, kind)]

    def audio(self) -> list[bytes]:
        return [e for e in self.sent if isinstance(e, bytes)]


class FakeServices:
    def __init__(self) -> None:
        self.down: set[str] = set()  # services that refuse connections
        self.vads: list[FakeStream[Any]] = []
        self.stts: list[FakeStream[Any]] = []
        self.ttss: list[FakeStream[Any]] = []
        self.tts_starts: list[TtsStart] = []
        # STT: the next final's text, and how long the final takes (None: never answers)
        self.transcript = "what is the weather like"
        self.final_delay_s: float | None = 0.02
        # TTS: audio length per character of text, in 20 ms PCM16 frames at the requested rate
        self.ms_per_char = 10.0
        self.tts_error: ServiceError | None = None
        self.tts_mute = False  # takes text, never answers (a stuck synthesis)
        # LLM: the reply, one word a token, and the delay before each token
        self.reply = "It is sunny and warm today. Enjoy the nice weather outside."
        self.token_delay_s = 0.01
        self.first_token_delay_s = 0.0  # extra wait before the first token (a busy LLM)
        self.llm_error: ServiceError | None = None
        self.llm_requests: list[LlmRequest] = []
        self.llm_finished = 0
        self.llm_stopped = 0  # generations the caller left early (cancelled)

    def check(self, service: str) -> None:
        if service in self.down:
            raise ServiceError(service, "service_unavailable", f"cannot connect to the {service} service")

    # --- VAD: events are scripted by the test -----------------------------------------------------

    async def vad(self, start: VadStart) -> FakeStream[Any]:
        self.check("vad")
        stream: FakeStream[Any] = FakeStream("vad")
        stream.sent.append(start)
        self.vads.append(stream)
        return stream

    @property
    def vad_stream(self) -> FakeStream[Any]:
        return self.vads[-1]

    def thresholds(self) -> list[float | None]:
        return [e.threshold for s in self.vads for e in s.sent if isinstance(e, VadStart | VadConfigure)]

    # --- STT: ready on start, a final after stop ------------------------------------------------

    async def stt(self) -> FakeStream[Any]:
        self.check("stt")
        stream: FakeStream[Any] = FakeStream("stt")
        utterance = 0

        async def on_send(item: Event | bytes) -> None:
            nonlocal utterance
            if isinstance(item, SttStart):
                utterance += 1
                stream.push(SttReady(utterance=utterance))
            elif isinstance(item, Stop) and self.final_delay_s is not None:
                text, delay, n = self.transcript, self.final_delay_s, utterance
                asyncio.get_running_loop().call_later(
                    delay, stream.push, Final(utterance=n, text=text, duration_ms=1000, processing_ms=delay * 1000)
                )
            elif isinstance(item, Cancel):
                stream.push(Cancelled(utterance=utterance))

        stream.on_send = on_send
        self.stts.append(stream)
        return stream

    # --- TTS: sentence events and PCM frames, as fast as it can ----------------------------------

    async def tts(self, start: TtsStart) -> FakeStream[Any]:
        self.check("tts")
        if self.tts_error is not None:
            raise self.tts_error
        rate = start.sample_rate or 16000
        stream: FakeStream[Any] = FakeStream("tts")
        pending = ""
        index = 0

        def speak(sentence: str) -> None:
            nonlocal index
            index += 1
            stream.push(SentenceStart(index=index, text=sentence))
            frame = b"\x01\x00" * (rate // 50)
            frames = max(1, round(len(sentence) * self.ms_per_char / 20))
            for _ in range(frames):
                stream.push(frame)
            stream.push(SentenceEnd(index=index, audio_ms=frames * 20.0))

        async def on_send(item: Event | bytes) -> None:
            nonlocal pending
            if self.tts_mute:
                return
            if isinstance(item, TtsText):
                pending += item.text
                *whole, pending = re.split(r"(?<=[.!?])\s+", pending)
                for sentence in whole:
                    speak(sentence.strip())
            elif isinstance(item, Stop):
                if pending.strip():
                    speak(pending.strip())
                pending = ""
                stream.push(Done())

        stream.on_send = on_send
        stream.sent.append(start)
        stream.push(AudioStart(format={"rate": rate}))
        self.tts_starts.append(start)
        self.ttss.append(stream)
        stream.queue.get_nowait()  # the audio_start answered the start (the real client consumes it too)
        return stream

    # --- LLM: one word a token -------------------------------------------------------------------

    async def llm(self, request: LlmRequest) -> AsyncIterator[str]:
        self.llm_requests.append(request)
        self.check("llm")
        finished = False
        try:
            if self.llm_error is not None:
                raise self.llm_error
            words = self.reply.split(" ")[: request.max_tokens]  # a word is a token here
            await asyncio.sleep(self.first_token_delay_s)
            for i, word in enumerate(words):
                await asyncio.sleep(self.token_delay_s)
                yield word if i == 0 else " " + word
            finished = True
            self.llm_finished += 1
        finally:
            if not finished:
                self.llm_stopped += 1


async def until(condition: Callable[[], object], within: float = 3.0, what: str = "") -> None:
    """Wait until `condition()` is true (the fakes and the app run on this test's event loop)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.005)
