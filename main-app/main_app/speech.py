"""The user's side of a session: mic audio -> VAD and STT -> speech marks and transcripts.

SpeechInput holds a session-long stream to each of VAD and STT (relinked with backoff when one drops;
voice input pauses meanwhile, typing keeps working). Every frame goes to the VAD; from the VAD's start
mark the utterance's frames, pre-roll included, go to the STT; at the VAD's stop mark the STT is asked
for the final transcript, which becomes the user's turn. What to do with a turn is the session's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from voice_common.audio import AudioFormat
from voice_common.backoff import Backoff
from voice_common.protocol import (
    ErrorEvent,
    Final,
    Interim,
    SpeechStarted,
    SpeechStopped,
    Stop,
    SttServerEvent,
    SttStart,
    Transcript,
    TurnEnd,
    VadConfigure,
    VadServerEvent,
    VadStart,
)

from .outbox import Outbox
from .services import EventStream, ServiceError, Services
from .settings import AppSettings

logger = logging.getLogger(__name__)


class TurnTaker(Protocol):
    """What speech input tells the session."""

    async def user_speaking(self) -> None:
        """The VAD heard the user start: a reply in progress should stop (barge-in)."""

    async def user_saying(self, text: str, eager: bool) -> None:
        """An interim transcript; `eager`: decoded at the first quiet, so probably the final one."""

    async def user_paused(self, complete: bool) -> None:
        """The user has been silent a moment; the turn model thinks the turn is `complete` (or not)."""

    async def user_said(self, text: str, ended_at: float) -> None:
        """A final transcript with words in it; `ended_at` is the monotonic end of the speech."""


class SpeechInput:
    def __init__(
        self,
        services: Services,
        settings: AppSettings,
        out: Outbox,
        turns: TurnTaker,
        fmt: AudioFormat,
        language: str | None,
    ) -> None:
        self.services = services
        self.settings = settings
        self.out = out
        self.turns = turns
        self.fmt = fmt
        self.language = language
        self.received_ms = 0.0  # audio received so far, on the session's stream clock
        self.ring: deque[tuple[float, bytes]] = deque()  # recent frames, for the pre-roll
        self.vad: EventStream[VadServerEvent] | None = None
        self.vad_offset_ms = 0.0  # the VAD stream's clock starts when it was (re)linked
        self.stt: EventStream[SttServerEvent] | None = None
        self.in_utterance = False
        self.speech_end: float | None = None
        self.turn_end: TurnEnd | None = None  # the turn model's latest verdict
        self.speaking = False  # the assistant is speaking: the VAD threshold is raised (echo guard)
        self.final_timer: asyncio.Task[None] | None = None
        self.group: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Until cancelled (the session ended): both links, and the final-transcript timer."""
        async with asyncio.TaskGroup() as group:
            self.group = group
            group.create_task(self.link("vad", "voice detection", self.open_vad, self.on_vad, self.vad_closed))
            group.create_task(self.link("stt", "speech recognition", self.open_stt, self.on_stt, self.stt_closed))

    async def link(
        self,
        service: str,
        what: str,
        open_: Callable[[], Awaitable[EventStream[Any]]],
        handle: Callable[[Any], Awaitable[None]],
        closed: Callable[[], None],
    ) -> None:
        # a link that stayed up 10 s starts over at 0.5 s; one refused or dropped at once waits longer each time
        backoff = Backoff(first=0.5, cap=5.0, reset_after_s=10.0)
        while True:
            try:
                stream = await open_()
                try:
                    await self.out.service_up(service)
                    backoff.up()
                    async for event in stream:
                        if not isinstance(event, bytes):
                            await handle(event)
                    raise ServiceError(service, "service_unavailable", f"the {what} service closed the stream")
                finally:
                    closed()
                    await stream.close(abort=True)
            except ServiceError as exc:
                await self.out.service_down(service, f"{what} unavailable ({exc.message}); typing still works")
            await asyncio.sleep(backoff.next())

    # --- audio in ---------------------------------------------------------------------------------

    async def feed(self, frame: bytes) -> None:
        if len(frame) % self.fmt.frame_bytes or not frame:
            await self.out.error("main-app", "invalid_audio", f"audio frame of {len(frame)} bytes is not whole samples")
            return
        start = self.received_ms
        self.received_ms += self.frame_ms(frame)
        self.ring.append((start, frame))
        while self.ring and self.ring[0][0] < self.received_ms - self.settings.preroll_ms - 1000:
            self.ring.popleft()
        with contextlib.suppress(ServiceError):  # a lost link is reported by its own loop
            if self.vad is not None:
                await self.vad.send(frame)
            if self.in_utterance and self.stt is not None:
                await self.stt.send(frame)

    def frame_ms(self, frame: bytes) -> float:
        return len(frame) / self.fmt.frame_bytes / self.fmt.rate * 1000

    # --- VAD --------------------------------------------------------------------------------------

    def threshold(self) -> float:
        return self.settings.vad_threshold_speaking if self.speaking else self.settings.vad_threshold

    async def set_speaking(self, speaking: bool) -> None:
        if speaking != self.speaking:
            self.speaking = speaking
            if self.vad is not None:
                with contextlib.suppress(ServiceError):
                    await self.vad.send(VadConfigure(threshold=self.threshold()))

    async def open_vad(self) -> EventStream[VadServerEvent]:
        s = self.settings
        start = VadStart(
            format=self.fmt,
            threshold=self.threshold(),
            min_silence_ms=s.end_of_turn_silence_ms,
            turn_detection=s.turn_detection,
            turn_silence_ms=s.turn_silence_ms,
            max_pause_ms=s.max_turn_pause_ms,
        )
        stream = await self.services.vad(start)
        self.vad, self.vad_offset_ms = stream, self.received_ms
        return stream

    def vad_closed(self) -> None:
        self.vad = None

    async def on_vad(self, event: VadServerEvent) -> None:
        if isinstance(event, SpeechStarted):
            t = event.t_ms + self.vad_offset_ms
            await self.out.send(SpeechStarted(t_ms=round(t, 1)))
            await self.begin_utterance(t)
            await self.turns.user_speaking()
        elif isinstance(event, SpeechStopped):
            t = event.t_ms + self.vad_offset_ms
            await self.out.send(SpeechStopped(t_ms=round(t, 1), duration_ms=event.duration_ms))
            self.speech_end = time.monotonic() - max(0.0, self.received_ms - t) / 1000
            await self.end_utterance()
        elif isinstance(event, TurnEnd):
            self.turn_end = event
            await self.turns.user_paused(event.complete)
            logger.debug(
                "turn model: p=%.2f complete=%s in %.0f ms", event.probability, event.complete, event.inference_ms
            )
        elif isinstance(event, ErrorEvent):
            await self.out.error("vad", event.code, event.message)

    # --- STT --------------------------------------------------------------------------------------

    async def open_stt(self) -> EventStream[SttServerEvent]:
        self.stt = await self.services.stt()
        return self.stt

    def stt_closed(self) -> None:
        self.stt, self.in_utterance = None, False

    async def begin_utterance(self, t_ms: float) -> None:
        if self.stt is None:
            return
        try:
            await self.stt.send(SttStart(format=self.fmt, language=self.language))
            for start, frame in list(self.ring):  # pre-roll: the audio since the VAD's start mark
                if start + self.frame_ms(frame) > t_ms:
                    await self.stt.send(frame)
            self.in_utterance = True
        except ServiceError:
            self.in_utterance = False

    async def end_utterance(self) -> None:
        if not self.in_utterance or self.stt is None:
            return
        self.in_utterance = False
        with contextlib.suppress(ServiceError):
            await self.stt.send(Stop())
        if self.final_timer is not None:
            self.final_timer.cancel()
        if self.group is not None:
            self.final_timer = self.group.create_task(self.final_timeout())

    async def final_timeout(self) -> None:
        await asyncio.sleep(self.settings.stt_final_timeout_s)
        self.final_timer = None
        await self.out.error("stt", "timeout", "speech recognition did not return a transcript in time; please repeat")
        await self.out.send(Transcript(final=True, text=""))

    async def on_stt(self, event: SttServerEvent) -> None:
        if isinstance(event, Interim):
            await self.out.send(Transcript(final=False, text=event.text))
            await self.turns.user_saying(event.text, event.eager)
        elif isinstance(event, Final):
            if self.final_timer is not None:
                self.final_timer.cancel()
                self.final_timer = None
            text = event.text.strip()
            await self.out.send(Transcript(final=True, text=text))
            if re.search(r"\w", text):
                await self.turns.user_said(text, self.speech_end or time.monotonic())
        elif isinstance(event, ErrorEvent) and event.code != "empty_utterance":
            await self.out.error("stt", event.code, event.message)
