"""One browser session: mic audio -> VAD + STT -> LLM -> TTS -> paced audio back, with barge-in.

Tasks per session (a task group: when one ends the others are cancelled): the browser reader, the
VAD link and the STT link (each reconnects by itself when its service comes back). Each reply is a
Turn running in its own task with its own LLM and TTS sockets, so cancelling a turn (barge-in, a new
message) closes those sockets, which stops generation and synthesis downstream; anything still in
flight for an old turn id is dropped before it reaches the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket
from pydantic import TypeAdapter
from voice_common.audio import AudioFormat
from voice_common.protocol import (
    ChatMessage,
    Done,
    ErrorEvent,
    Event,
    Final,
    Interim,
    Interrupt,
    Interrupted,
    Playback,
    ProtocolError,
    ReplyAudioStart,
    ReplyDelta,
    ReplyDone,
    SentenceEnd,
    SentenceStart,
    ServiceStatus,
    SessionEnd,
    SessionStart,
    SpeechStarted,
    SpeechStopped,
    Stop,
    SttStart,
    Transcript,
    TtsStart,
    TtsText,
    TurnMetrics,
    UserText,
    VadConfigure,
    VadStart,
    browser_events,
    parse_event,
    stt_server_events,
    tts_server_events,
    vad_server_events,
)
from voice_common.tasks import run_until_first_done
from voice_common.ws import frames, send_event
from websockets.asyncio.client import ClientConnection

from .downstream import CONNECTION_ERRORS, ServiceError, connect, hang_up, llm_tokens

if TYPE_CHECKING:
    from .app import AppContext

logger = logging.getLogger(__name__)
LLM_DOWN_REPLY = "Sorry, I can't reach my language model right now. Please try again in a moment."


@dataclass
class Turn:
    id: int
    source: str
    t0: float  # monotonic: end of the user's speech, or when the typed message arrived
    user_text: str
    speak: bool
    task: asyncio.Task[None] | None = None
    text: list[str] = field(default_factory=list)
    sentences: list[tuple[str, float, float]] = field(default_factory=list)  # spoken text, start/end ms
    audio_ms: float = 0.0
    play_end: float = 0.0  # monotonic time the client finishes playing what was sent
    played_ms: float | None = None  # reported by the client
    audio_started: bool = False
    finished: bool = False
    message_id: int | None = None
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, (time.monotonic() - self.t0) * 1000)

    @property
    def reply(self) -> str:
        return "".join(self.text).strip()

    def heard(self) -> str:
        """What the user actually heard: whole sentences before the played position, then the played
        fraction of the sentence in progress."""
        if not self.speak or not self.audio_started:
            return self.reply if not self.speak else ""
        played = self.played_ms
        if played is None:  # no report from the client: estimate from what we paced out
            played = max(0.0, self.audio_ms - max(0.0, self.play_end - time.monotonic()) * 1000)
        words: list[str] = []
        for text, start, end in self.sentences:
            if played >= end:
                words.extend(text.split())
            elif played > start:
                parts = text.split()
                words.extend(parts[: int(len(parts) * (played - start) / max(1.0, end - start))])
                break
        return " ".join(words)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def is_echo(transcript: str, reply: str) -> bool:
    """The assistant hearing itself: the transcript is, nearly word for word, a run of what it is saying."""
    heard, said = _words(transcript), _words(reply)
    if len(heard) < 3:
        return False
    match = SequenceMatcher(None, heard, said, autojunk=False).find_longest_match(0, len(heard), 0, len(said))
    return match.size >= 0.7 * len(heard)


class Session:
    def __init__(self, socket: WebSocket, ctx: AppContext, start: SessionStart, conversation_id: str) -> None:
        self.socket = socket
        self.ctx = ctx
        self.settings = ctx.settings
        self.start = start
        self.fmt: AudioFormat = start.format
        self.cid = conversation_id
        self.speak = start.speak
        self.received_ms = 0.0
        self.ring: deque[tuple[float, bytes]] = deque()
        self.vad: ClientConnection | None = None
        self.vad_offset_ms = 0.0
        self.stt: ClientConnection | None = None
        self.in_utterance = False
        self.awaiting_final: asyncio.TimerHandle | None = None
        self.speech_end: float | None = None
        self.turn: Turn | None = None
        self.last_turn: Turn | None = None
        self.turns = 0
        self.down: set[str] = set()
        self.closed = False

    # --- plumbing ---------------------------------------------------------------------------------

    async def send(self, event: Event) -> None:
        if not self.closed and not await send_event(self.socket, event):
            self.closed = True

    async def error(self, service: str, code: str, message: str, fatal: bool = False) -> None:
        logger.warning("session %s: %s %s: %s", self.cid, service, code, message)
        await self.send(ErrorEvent(service=service, code=code, message=message, fatal=fatal))

    async def service_down(self, service: str, message: str) -> None:
        if service not in self.down:  # one error per outage, not one per frame
            self.down.add(service)
            await self.error(service, "service_unavailable", message)
            await self.send(ServiceStatus(service=service, status="down"))

    async def service_up(self, service: str) -> None:
        if service in self.down:
            self.down.discard(service)
            await self.send(ServiceStatus(service=service, status="ok"))

    async def run(self) -> None:
        try:
            await run_until_first_done(self.browser_loop(), self.vad_loop(), self.stt_loop())
        finally:
            self.closed = True
            if self.awaiting_final is not None:
                self.awaiting_final.cancel()
            await self.cancel_turn(barge_in=False)

    # --- browser ----------------------------------------------------------------------------------

    async def browser_loop(self) -> None:
        async for event in frames(self.socket, browser_events, "main-app"):
            if isinstance(event, bytes):
                await self.on_audio(event)
            elif isinstance(event, UserText):
                await self.start_turn(event.text, "text", time.monotonic())
            elif isinstance(event, Interrupt):
                await self.interrupt()
            elif isinstance(event, Playback):
                await self.on_playback(event)
            elif isinstance(event, SessionEnd):
                return
            elif isinstance(event, SessionStart):
                self.speak = event.speak  # settings change mid-session (e.g. the spoken-replies toggle)
            elif isinstance(event, VadConfigure) and self.vad is not None:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await self.vad.send(event.dump())

    async def on_audio(self, frame: bytes) -> None:
        if len(frame) % self.fmt.frame_bytes or not frame:
            await self.error("main-app", "invalid_audio", f"audio frame of {len(frame)} bytes is not whole samples")
            return
        start = self.received_ms
        self.received_ms += len(frame) / self.fmt.frame_bytes / self.fmt.rate * 1000
        self.ring.append((start, frame))
        while self.ring and self.ring[0][0] < self.received_ms - self.settings.preroll_ms - 1000:
            self.ring.popleft()
        if self.vad is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.vad.send(frame)
        if self.in_utterance and self.stt is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.stt.send(frame)

    async def on_playback(self, event: Playback) -> None:
        for turn in (self.turn, self.last_turn):
            if turn is not None and turn.id == event.turn:
                turn.played_ms = event.played_ms
                if turn.finished and turn.message_id is not None and turn.marks.get("interrupted"):
                    await self.ctx.store.update(turn.message_id, turn.heard(), interrupted=True)

    # --- VAD --------------------------------------------------------------------------------------

    async def vad_loop(self) -> None:
        async def opened(ws: ClientConnection) -> None:
            start = VadStart(
                format=self.fmt, threshold=self.vad_threshold(), min_silence_ms=self.settings.end_of_turn_silence_ms
            )
            await ws.send(start.dump())
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await ws.recv()  # the ready event
            self.vad_offset_ms, self.vad = self.received_ms, ws

        def closed() -> None:
            self.vad = None

        await self.keep_linked("vad", "voice detection", vad_server_events, opened, closed, self.on_vad_event)

    async def keep_linked(
        self,
        service: str,
        what: str,
        events: TypeAdapter[Any],
        opened: Callable[[ClientConnection], Awaitable[None]],
        closed: Callable[[], None],
        handle: Callable[[Event], Awaitable[None]],
    ) -> None:
        """Hold a session-long socket to `service`; when it drops, tell the client and reconnect with
        backoff until the service is back. Voice input pauses meanwhile; typing keeps working."""
        backoff = 0.5
        while True:
            try:
                ws = await connect(self.settings, service)
                try:
                    await opened(ws)
                    await self.service_up(service)
                    backoff = 0.5
                    async for raw in ws:
                        try:
                            event = parse_event(events, raw)
                        except ProtocolError as exc:  # e.g. a newer service's event: skip it
                            logger.warning("session %s: unexpected %s event: %s", self.cid, service, exc)
                            continue
                        await handle(event)
                finally:
                    closed()
                    await ws.close()
                raise ServiceError(service, "service_unavailable", f"the {what} service closed the stream")
            except (ServiceError, *CONNECTION_ERRORS) as exc:
                await self.service_down(service, f"{what} unavailable ({exc}); typing still works")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def vad_threshold(self) -> float:
        speaking = self.turn is not None and self.turn.audio_started and not self.turn.finished
        return self.settings.vad_threshold_speaking if speaking else self.settings.vad_threshold

    async def set_vad_threshold(self) -> None:
        if self.vad is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.vad.send(VadConfigure(threshold=self.vad_threshold()).dump())

    async def on_vad_event(self, event: Event) -> None:
        if isinstance(event, SpeechStarted):
            t = event.t_ms + self.vad_offset_ms
            await self.send(SpeechStarted(t_ms=round(t, 1)))
            await self.begin_utterance(t)
            if self.turn is not None and not self.turn.finished:
                await self.interrupt()  # barge-in
        elif isinstance(event, SpeechStopped):
            t = event.t_ms + self.vad_offset_ms
            await self.send(SpeechStopped(t_ms=round(t, 1), duration_ms=event.duration_ms))
            self.speech_end = time.monotonic() - max(0.0, self.received_ms - t) / 1000
            await self.end_utterance()

    # --- STT --------------------------------------------------------------------------------------

    async def stt_loop(self) -> None:
        async def opened(ws: ClientConnection) -> None:
            self.stt = ws

        def closed() -> None:
            self.stt, self.in_utterance = None, False

        await self.keep_linked("stt", "speech recognition", stt_server_events, opened, closed, self.on_stt_event)

    async def begin_utterance(self, t_ms: float) -> None:
        if self.stt is None:
            return
        try:
            await self.stt.send(SttStart(format=self.fmt, language=self.start.language).dump())
            for start, frame in list(self.ring):  # pre-roll: the audio since the VAD's start mark
                if start + len(frame) / self.fmt.frame_bytes / self.fmt.rate * 1000 > t_ms:
                    await self.stt.send(frame)
            self.in_utterance = True
        except CONNECTION_ERRORS:
            self.in_utterance = False

    async def end_utterance(self) -> None:
        if not self.in_utterance or self.stt is None:
            return
        self.in_utterance = False
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self.stt.send(Stop().dump())
        self.awaiting_final = asyncio.get_running_loop().call_later(
            self.settings.stt_final_timeout_s, lambda: asyncio.ensure_future(self.final_timed_out())
        )

    async def final_timed_out(self) -> None:
        await self.error("stt", "timeout", "speech recognition did not return a transcript in time; please repeat")
        await self.send(Transcript(final=True, text=""))

    async def on_stt_event(self, event: Event) -> None:
        if isinstance(event, Interim):
            await self.send(Transcript(final=False, text=event.text))
        elif isinstance(event, Final):
            if self.awaiting_final is not None:
                self.awaiting_final.cancel()
            text = event.text.strip()
            await self.send(Transcript(final=True, text=text))
            recent = self.turn or self.last_turn
            if not text or not re.search(r"\w", text):
                return
            if (
                recent is not None
                and recent.speak
                and is_echo(text, recent.reply)
                and (not recent.finished or time.monotonic() - recent.play_end < 2.0)
            ):
                logger.info("session %s: dropped an echo of the assistant: %r", self.cid, text)
                return
            await self.start_turn(text, "voice", self.speech_end or time.monotonic())
        elif isinstance(event, ErrorEvent) and event.code != "empty_utterance":
            await self.error("stt", event.code, event.message)

    # --- turns ------------------------------------------------------------------------------------

    async def start_turn(self, user_text: str, source: str, t0: float) -> None:
        await self.interrupt()
        self.turns += 1
        turn = Turn(self.turns, source, t0, user_text.strip(), self.speak)
        if source == "voice":
            turn.mark("stt_final")
        self.turn = turn
        turn.task = asyncio.create_task(self.run_turn(turn))

    async def interrupt(self) -> None:
        """Barge-in or a new message: stop the current reply now and keep only what was heard."""
        turn = self.turn
        if turn is None or turn.finished:
            return
        turn.mark("interrupted")
        if turn.audio_started:
            await self.send(Interrupted(turn=turn.id, heard_text=turn.heard()))
        await self.cancel_turn(barge_in=True)

    async def cancel_turn(self, barge_in: bool) -> None:
        """Stop the current turn's task. What is kept: the heard part of the reply (barge-in), or the
        whole reply if it was complete and the browser simply went away."""
        turn = self.turn
        if turn is None or turn.finished:
            return
        turn.finished = True
        if turn.task is not None and not turn.task.done():
            turn.task.cancel()
            await asyncio.gather(turn.task, return_exceptions=True)
        self.last_turn, self.turn = turn, None
        heard = turn.heard()
        if barge_in:
            turn.play_end = min(turn.play_end, time.monotonic())  # the client flushed its queue
        if turn.message_id is None and heard:
            turn.message_id = await self.ctx.store.add(
                self.cid, "assistant", heard, turn.source, turn.id, interrupted=True
            )
        elif turn.message_id is not None and barge_in:
            await self.ctx.store.update(turn.message_id, heard, interrupted=True)
        if "reply_done" not in turn.marks:
            await self.send(ReplyDone(turn=turn.id, text=heard, interrupted=True))
        await self.set_vad_threshold()

    async def run_turn(self, turn: Turn) -> None:
        try:
            await self.ctx.store.add(self.cid, "user", turn.user_text, turn.source, turn.id)
            history = [
                ChatMessage(role=m["role"], content=m["content"]) for m in await self.ctx.store.messages(self.cid)
            ]
            tts = await self.open_tts(turn) if turn.speak else None
            completed = False
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.pump_llm(turn, history, tts))
                    if tts is not None:
                        group.create_task(self.pump_tts(turn, tts))
                completed = True
            finally:
                if tts is not None:
                    await hang_up(tts, abort=not completed)
            if turn.reply and turn.marks.get("llm_failed") is None:
                turn.message_id = await self.ctx.store.add(self.cid, "assistant", turn.reply, turn.source, turn.id)
            turn.mark("reply_done")
            await self.send(ReplyDone(turn=turn.id, text=turn.reply))
            await self.report_metrics(turn)
            if turn.audio_started:  # stay interruptible until the client has played it all
                await asyncio.sleep(max(0.0, turn.play_end - time.monotonic()))
        finally:
            if self.turn is turn:
                turn.finished = True
                self.last_turn, self.turn = turn, None
                if not self.closed:
                    await self.set_vad_threshold()

    async def open_tts(self, turn: Turn) -> ClientConnection | None:
        try:
            ws = await connect(self.settings, "tts")
            await ws.send(
                TtsStart(
                    voice=self.start.voice or self.settings.voice, sample_rate=self.settings.output_sample_rate
                ).dump()
            )
            await self.service_up("tts")
            return ws
        except (ServiceError, *CONNECTION_ERRORS) as exc:
            await self.service_down("tts", f"speech synthesis unavailable ({exc}); replying in text")
            turn.speak = False
            return None

    async def pump_llm(self, turn: Turn, history: list[ChatMessage], tts: ClientConnection | None) -> None:
        try:
            async for token in llm_tokens(self.settings, history):
                turn.mark("llm_first_token")
                turn.text.append(token)
                await self.send(ReplyDelta(turn=turn.id, text=token))
                if tts is not None and turn.speak:
                    try:
                        await tts.send(TtsText(text=token).dump())
                    except CONNECTION_ERRORS:
                        turn.speak = False
            await self.service_up("llm")
        except ServiceError as exc:
            turn.mark("llm_failed")
            if exc.code == "service_unavailable":
                await self.service_down("llm", exc.message)
            else:
                await self.error("llm", exc.code, exc.message)
            if not turn.text:
                turn.text.append(LLM_DOWN_REPLY)
                await self.send(ReplyDelta(turn=turn.id, text=LLM_DOWN_REPLY))
                if tts is not None and turn.speak:
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        await tts.send(TtsText(text=LLM_DOWN_REPLY).dump())
        if tts is not None and turn.speak:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await tts.send(Stop().dump())

    async def pump_tts(self, turn: Turn, tts: ClientConnection) -> None:
        """Audio from the TTS service to the browser, paced to about real time plus a small lead."""
        rate = self.settings.output_sample_rate
        lead = self.settings.playback_lead_ms / 1000
        sentence: tuple[str, float] | None = None
        try:
            while True:
                async with asyncio.timeout(self.settings.tts_timeout_s if turn.speak else None):
                    msg = await tts.recv()
                if isinstance(msg, bytes):
                    turn.mark("tts_first_audio")
                    now = time.monotonic()
                    if not turn.audio_started:
                        turn.audio_started = True
                        turn.play_end = now
                        await self.send(ReplyAudioStart(turn=turn.id, format=AudioFormat(rate=rate)))
                        await self.set_vad_threshold()
                    ahead = turn.play_end - now
                    if ahead > lead:
                        await asyncio.sleep(ahead - lead)
                    if self.closed or self.turn is not turn:
                        return
                    await self.socket.send_bytes(msg)
                    turn.mark("first_audio_sent")
                    frame_s = len(msg) / 2 / rate
                    turn.play_end = max(turn.play_end, time.monotonic()) + frame_s
                    turn.audio_ms += frame_s * 1000
                    continue
                event = parse_event(tts_server_events, msg)
                if isinstance(event, SentenceStart):
                    sentence = (event.text, turn.audio_ms)
                elif isinstance(event, SentenceEnd) and sentence is not None:
                    turn.sentences.append((sentence[0], sentence[1], turn.audio_ms))
                    sentence = None
                elif isinstance(event, Done):
                    return
                elif isinstance(event, ErrorEvent):
                    await self.error("tts", event.code, event.message)
        except (TimeoutError, ProtocolError, *CONNECTION_ERRORS) as exc:
            turn.speak = False
            await self.service_down("tts", f"speech synthesis failed ({type(exc).__name__}); replying in text")
        finally:
            if sentence is not None:
                turn.sentences.append((sentence[0], sentence[1], turn.audio_ms))

    async def report_metrics(self, turn: Turn) -> None:
        m = turn.marks
        event = TurnMetrics(
            turn=turn.id,
            source="voice" if turn.source == "voice" else "text",
            stt_final_ms=_r(m.get("stt_final")),
            llm_first_token_ms=_r(m.get("llm_first_token")),
            tts_first_audio_ms=_r(m.get("tts_first_audio")),
            first_audio_sent_ms=_r(m.get("first_audio_sent")),
            reply_done_ms=_r(m.get("reply_done")),
        )
        self.ctx.observe(event)
        await self.send(event)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
