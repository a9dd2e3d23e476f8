"""One assistant turn as an object with explicit states (shaped like livekit-agents' SpeechHandle).

A Reply owns its task and its LLM and TTS streams: it streams the text to the browser and the TTS,
paces the TTS audio to the browser at about real time, knows what the user actually heard, and stores
itself in the conversation. Interrupting it (barge-in, a new message) or closing it (the browser left)
closes both streams at once, which stops generation and synthesis downstream.

    PENDING -> GENERATING (first token) -> SPEAKING (first audio) -> DONE (played out)
          \\________________\\___________________\\-> INTERRUPTED (only what was heard is kept)

A speculative reply starts `held`, on the STT's eager transcript before the turn has ended: it generates
and synthesizes, but nothing reaches the browser or the store until `release()` (the final transcript
matched); `discard()` drops it without a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from enum import StrEnum
from typing import Any

from voice_common.audio import AudioFormat
from voice_common.chat import trim_history
from voice_common.limits import BACKGROUND, URGENT
from voice_common.protocol import (
    ChatMessage,
    Done,
    ErrorEvent,
    Event,
    Interrupted,
    LlmRequest,
    ReplyAudioStart,
    ReplyDelta,
    ReplyDone,
    SentenceEnd,
    SentenceStart,
    Stop,
    TtsServerEvent,
    TtsStart,
    TtsText,
    TurnMetrics,
)

from .outbox import Outbox
from .services import EventStream, ServiceError, Services
from .settings import AppSettings
from .store import Store

logger = logging.getLogger(__name__)
LLM_DOWN_REPLY = "Sorry, I can't reach my language model right now. Please try again in a moment."
LLM_BUSY_REPLY = "Sorry, I'm talking with too many people right now. Please try again in a moment."
LLM_FAILED_REPLY = "Sorry, my language model could not answer that. Please try again."
SENTENCE_END = re.compile(r"[.!?\n]")
ECHO_WINDOW_S = 2.0  # after playback ends, a transcript can still be the tail of the reply's echo


class ReplyState(StrEnum):
    PENDING = "pending"
    GENERATING = "generating"
    SPEAKING = "speaking"
    DONE = "done"
    INTERRUPTED = "interrupted"


@dataclass
class Generations:
    """How many replies this main-app is generating right now, over all sessions: a speculation is only
    worth starting when it does not queue behind (or delay) real replies at the LLM."""

    running: int = 0


@dataclass
class ReplyContext:
    """What every reply of a session shares."""

    services: Services
    store: Store
    out: Outbox
    settings: AppSettings
    conversation_id: str
    observe: Callable[[TurnMetrics], None]
    on_state: Callable[[Reply], Awaitable[None]]
    generations: Generations = field(default_factory=Generations)


def llm_request(settings: AppSettings, history: list[ChatMessage], conversation: str, speculative: bool) -> LlmRequest:
    return LlmRequest(
        # an interrupted reply nobody heard is stored empty: the LLM refuses empty messages
        messages=trim_history([m for m in history if m.content.strip()], settings.history_tokens),
        max_tokens=settings.max_reply_tokens,
        temperature=settings.temperature,
        system_prompt=settings.system_prompt,
        priority=BACKGROUND if speculative else URGENT,  # a guess waits behind replies someone waits for
        prompt_cache_key=conversation,  # the LLM keeps this conversation's prompt cached in one place
    )


def llm_fallback(code: str) -> str:
    """What the assistant says when the language model gave no answer: unreachable, busy, or refused."""
    if code in ("service_unavailable", "timeout", "backend_unreachable"):
        return LLM_DOWN_REPLY
    if code in ("too_many_streams", "not_ready", "busy", "queue_full"):
        return LLM_BUSY_REPLY
    return LLM_FAILED_REPLY


class Reply:
    def __init__(
        self,
        ctx: ReplyContext,
        turn: int,
        source: str,
        t0: float,
        speak: bool,
        voice: str | None = None,
        history: list[ChatMessage] | None = None,
        held: bool = False,
    ) -> None:
        self.ctx = ctx
        self.out = ctx.out
        self.settings = ctx.settings
        self.turn = turn
        self.source = source  # "voice" or "text"
        self.t0 = t0  # monotonic: end of the user's speech, or when the typed message arrived
        self.speak = speak
        self.voice = voice
        self.state = ReplyState.PENDING
        self.text: list[str] = []
        self.failed = False  # the LLM failed: the apology is shown but not stored
        self.generated = False  # all text and audio produced (reply_done sent)
        self.sentences: list[tuple[str, float, float]] = []  # spoken text, start/end ms in the reply audio
        self.audio_ms = 0.0
        self.audio_started = False
        self.play_end = 0.0  # monotonic time the client finishes playing what was sent
        self.played_ms: float | None = None  # reported by the client
        self.marks: dict[str, float] = {}  # latency stages: monotonic times
        self.history = history  # the conversation to answer; None: as stored
        self.speculative = held
        self.tts_wait: asyncio.Timeout | None = None  # `play`'s wait for the next TTS item
        self.tts_owed = False  # text or stop went to the TTS and nothing came back since
        self.released = asyncio.Event()  # output may go to the browser and the store
        if not held:
            self.released.set()
        self.held_events: list[Event] = []
        self.turn_probability: float | None = None
        self.turn_inference_ms: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.stored: asyncio.Future[int] | None = None  # the assistant message, once it is being stored

    # --- what it is -------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state not in (ReplyState.DONE, ReplyState.INTERRUPTED)

    @property
    def reply(self) -> str:
        return "".join(self.text).strip()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def heard(self) -> str:
        """What the user actually heard: whole sentences before the played position, then the played
        fraction of the sentence in progress. A text-only reply was read in full."""
        if not self.speak:
            return self.reply
        if not self.audio_started:
            return ""
        played = self.played_ms
        if played is None:  # no report from the client: estimate from what was paced out
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

    def is_echo(self, transcript: str) -> bool:
        """The assistant hearing itself: while it speaks (or just after), a transcript that is, nearly
        word for word, a run of what it is saying."""
        recent = self.active or time.monotonic() - self.play_end < ECHO_WINDOW_S
        return self.speak and recent and is_echo(transcript, self.reply)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        """Run in a task of the session's group (so it also ends with the connection)."""
        self.task = spawn(self.run())

    async def release(self, turn: int, t0: float) -> None:
        """The turn ended as speculated: from now on this is reply `turn`, timed from `t0`."""
        self.turn, self.t0 = turn, t0
        while self.held_events:  # in order, also what is emitted meanwhile
            event = self.held_events.pop(0)
            if hasattr(event, "turn"):
                event.turn = turn
            if self.state is not ReplyState.INTERRUPTED:
                await self.out.send(event)
        self.released.set()

    async def discard(self) -> None:
        """The speculation was wrong: stop, and leave no trace in the browser or the store."""
        self.state = ReplyState.INTERRUPTED
        await self.cancel()

    async def interrupt(self) -> None:
        """Barge-in or a new message: stop now, and keep only what the user heard."""
        if not self.active:
            return
        self.state = ReplyState.INTERRUPTED  # from here on nothing of this reply reaches the browser
        self.mark("interrupted")
        if self.audio_started:
            await self.out.send(Interrupted(turn=self.turn, heard_text=self.heard()))
        await self.cancel()
        self.play_end = min(self.play_end, time.monotonic())  # the client flushes its queue
        heard = self.heard()
        await self.store(heard, interrupted=True)
        if not self.generated:
            await self.out.send(ReplyDone(turn=self.turn, text=heard, interrupted=True))
        await self.ctx.on_state(self)

    async def close(self) -> None:
        """The session ended: a complete reply stays stored whole, an unfinished one as far as heard."""
        if not self.active:
            return
        self.state = ReplyState.DONE if self.generated else ReplyState.INTERRUPTED
        await self.cancel()
        if not self.generated:
            await self.store(self.heard(), interrupted=True)

    async def on_playback(self, played_ms: float) -> None:
        """The client's report of how much it played; after an interruption it corrects what is stored."""
        self.played_ms = played_ms
        if self.state is ReplyState.INTERRUPTED and self.stored is not None:
            await self.store(self.heard(), interrupted=True)

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def set_state(self, state: ReplyState) -> None:
        if self.active and state is not self.state:
            self.state = state
            await self.ctx.on_state(self)

    async def store(self, text: str, interrupted: bool = False) -> None:
        """Add the assistant message once, then update it. The insert is shielded: if this reply is
        cancelled meanwhile, the insert still completes and a later call updates that same row."""
        store, cid = self.ctx.store, self.ctx.conversation_id
        if self.stored is None:
            if not text:
                return
            add = store.add(cid, "assistant", text, self.source, self.turn, interrupted=interrupted)
            self.stored = asyncio.ensure_future(add)
            await asyncio.shield(self.stored)
        else:
            await store.update(await asyncio.shield(self.stored), text, interrupted=interrupted)

    # --- the work ---------------------------------------------------------------------------------

    async def run(self) -> None:
        history = self.history or [
            ChatMessage(role=m["role"], content=m["content"])
            for m in await self.ctx.store.messages(self.ctx.conversation_id)
        ]
        tts = await self.open_tts() if self.speak else None
        completed = False
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.generate(history, tts))
                if tts is not None:
                    group.create_task(self.play(tts))
            completed = True
        finally:
            if tts is not None:
                await tts.close(abort=not completed)
        await self.released.wait()
        if self.reply and not self.failed:
            await self.store(self.reply)
        self.mark("reply_done")
        self.generated = True
        await self.emit(ReplyDone(turn=self.turn, text=self.reply))
        await self.report_metrics()
        if self.audio_started:  # stay interruptible until the client has played it all
            await asyncio.sleep(max(0.0, self.play_end - time.monotonic()))
        await self.set_state(ReplyState.DONE)

    async def emit(self, event: Event) -> None:
        if self.state is ReplyState.INTERRUPTED:
            return
        if not self.released.is_set():
            self.held_events.append(event)
        else:
            await self.out.send(event)

    async def open_tts(self) -> EventStream[TtsServerEvent] | None:
        start = TtsStart(voice=self.voice or self.settings.voice, sample_rate=self.settings.output_sample_rate)
        try:
            tts = await self.ctx.services.tts(start)
        except ServiceError as exc:
            self.speak = False
            if exc.code in ("service_unavailable", "timeout"):
                await self.out.service_down("tts", f"speech synthesis unavailable ({exc.message}); replying in text")
            else:  # e.g. an unknown voice: say so once, reply in text
                await self.out.error("tts", exc.code, exc.message)
            return None
        await self.out.service_up("tts")
        return tts

    async def say(self, tts: EventStream[TtsServerEvent] | None, text: str) -> None:
        if tts is not None and self.speak:
            try:
                await tts.send(TtsText(text=text))
            except ServiceError:
                self.speak = False
            self.expect_tts()

    def expect_tts(self) -> None:
        """The TTS owes an answer now: from here on `tts_timeout_s` without one means it is stuck. While it
        owes nothing (the LLM is still thinking, slow under load) waiting is not its fault."""
        self.tts_owed = True
        if self.tts_wait is not None and self.tts_wait.when() is None:
            self.tts_wait.reschedule(asyncio.get_running_loop().time() + self.settings.tts_timeout_s)

    async def generate(self, history: list[ChatMessage], tts: EventStream[TtsServerEvent] | None) -> None:
        self.ctx.generations.running += 1
        try:
            await self.generate_text(history, tts)
        finally:
            self.ctx.generations.running -= 1

    async def generate_text(self, history: list[ChatMessage], tts: EventStream[TtsServerEvent] | None) -> None:
        try:
            async for token in self.ctx.services.llm(
                llm_request(self.settings, history, self.ctx.conversation_id, self.speculative)
            ):
                self.mark("llm_first_token")
                if self.state is ReplyState.PENDING:
                    await self.set_state(ReplyState.GENERATING)
                self.text.append(token)
                await self.emit(ReplyDelta(turn=self.turn, text=token))
                await self.say(tts, token)
                if self.released.is_set() and SENTENCE_END.search(token):
                    # stored as far as it went, sentence by sentence: a main-app that dies mid-reply (a
                    # replica killed) leaves the conversation with what was said, marked unfinished
                    await self.store(self.reply, interrupted=True)
            await self.out.service_up("llm")
        except ServiceError as exc:
            self.failed = True
            if exc.code == "service_unavailable":
                await self.out.service_down("llm", exc.message)
            else:
                await self.out.error("llm", exc.code, exc.message)
            if not self.text:
                fallback = llm_fallback(exc.code)
                self.text.append(fallback)
                await self.emit(ReplyDelta(turn=self.turn, text=fallback))
                await self.say(tts, fallback)
        if tts is not None and self.speak:
            with contextlib.suppress(ServiceError):
                await tts.send(Stop())
            self.expect_tts()

    async def play(self, tts: EventStream[TtsServerEvent]) -> None:
        """Audio from the TTS stream to the browser, paced to about real time plus a small lead, with
        the sentence timings that `heard()` needs."""
        sentence: tuple[str, float] | None = None
        items = aiter(tts)
        try:
            while True:
                async with asyncio.timeout(None) as self.tts_wait:
                    if self.tts_owed and self.speak:
                        self.expect_tts()
                    item = await anext(items, None)
                self.tts_wait, self.tts_owed = None, False
                if item is None:
                    raise ServiceError("tts", "service_unavailable", "the synthesis stream ended early")
                if isinstance(item, bytes):
                    await self.send_audio(item)
                elif isinstance(item, SentenceStart):
                    sentence = (item.text, self.audio_ms)
                elif isinstance(item, SentenceEnd) and sentence is not None:
                    self.sentences.append((sentence[0], sentence[1], self.audio_ms))
                    sentence = None
                elif isinstance(item, Done):
                    return
                elif isinstance(item, ErrorEvent):
                    await self.out.error("tts", item.code, item.message)
        except (TimeoutError, ServiceError) as exc:
            self.speak = False
            why = exc.message if isinstance(exc, ServiceError) else f"no audio for {self.settings.tts_timeout_s:g} s"
            await self.out.service_down("tts", f"speech synthesis failed ({why}); replying in text")
        finally:
            if sentence is not None:
                self.sentences.append((sentence[0], sentence[1], self.audio_ms))

    async def send_audio(self, frame: bytes) -> None:
        rate = self.settings.output_sample_rate
        self.mark("tts_first_audio")
        await self.released.wait()  # held audio waits in the TTS stream (bounded by TTS_MAX_CHARS)
        now = time.monotonic()
        if not self.audio_started:
            self.audio_started = True
            self.play_end = now
            await self.emit(ReplyAudioStart(turn=self.turn, format=AudioFormat(rate=rate)))
            await self.set_state(ReplyState.SPEAKING)
        ahead = self.play_end - now
        lead = self.settings.playback_lead_ms / 1000
        if ahead > lead:
            await asyncio.sleep(ahead - lead)
        if self.state is ReplyState.INTERRUPTED:
            return
        await self.out.audio(frame)
        self.mark("first_audio_sent")
        frame_s = len(frame) / 2 / rate
        self.play_end = max(self.play_end, time.monotonic()) + frame_s
        self.audio_ms += frame_s * 1000

    def since_t0(self, mark: str) -> float | None:
        """ms from the end of the user's turn; negative when a speculative reply was ahead of it."""
        at = self.marks.get(mark)
        return None if at is None else round((at - self.t0) * 1000, 1)

    async def report_metrics(self) -> None:
        event = TurnMetrics(
            turn=self.turn,
            source="voice" if self.source == "voice" else "text",
            stt_final_ms=self.since_t0("stt_final"),
            llm_first_token_ms=self.since_t0("llm_first_token"),
            tts_first_audio_ms=self.since_t0("tts_first_audio"),
            first_audio_sent_ms=self.since_t0("first_audio_sent"),
            reply_done_ms=self.since_t0("reply_done"),
            speculative=self.speculative,
            turn_probability=self.turn_probability,
            turn_inference_ms=self.turn_inference_ms,
        )
        self.ctx.observe(event)
        await self.emit(event)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def is_echo(transcript: str, reply: str) -> bool:
    """Nearly word for word (70 % of at least three words) a run of the reply."""
    heard, said = _words(transcript), _words(reply)
    if len(heard) < 3:
        return False
    match = SequenceMatcher(None, heard, said, autojunk=False).find_longest_match(0, len(heard), 0, len(said))
    return match.size >= 0.7 * len(heard)
