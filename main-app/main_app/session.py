"""One browser connection: routes the browser's events to speech input and replies, theirs back.

    browser audio --> SpeechInput --(user_speaking: barge-in / user_said: a turn)--> Session
    typed text ---------------------------------------------------------------------> Session
    Session --> Reply (one at a time; the newest interrupts the one before) --> browser

Everything per connection (speech input's links, the reply) runs in the connection's task group and
ends with it. Nothing of a session lives on the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING

from fastapi import WebSocket
from voice_common.audio import AudioError, AudioFormat
from voice_common.errors import ApiError
from voice_common.protocol import (
    BrowserEvent,
    ChatMessage,
    Interrupt,
    Playback,
    SessionConfigure,
    SessionEnd,
    SessionReady,
    SessionStart,
    UserText,
    browser_events,
)
from voice_common.streams import StreamHandler

from .outbox import Outbox
from .owner import owner_of
from .reply import Reply, ReplyContext, ReplyState, llm_request
from .services import ServiceError
from .speech import SpeechInput

if TYPE_CHECKING:
    from .app import AppContext

logger = logging.getLogger(__name__)


def words(text: str) -> list[str]:
    """What must match between a speculation and the final: the words, not case or punctuation."""
    return re.findall(r"[a-z0-9']+", text.lower())


class Session(StreamHandler[BrowserEvent]):
    service = "main-app"
    events = browser_events

    def __init__(self, socket: WebSocket, ctx: AppContext) -> None:
        super().__init__(socket)
        self.ctx = ctx
        self.settings = ctx.settings
        self.out = Outbox(self.send, self.send_audio)
        self.conversation_id: str | None = None
        self.replies: ReplyContext | None = None  # what every reply of this session shares, once started
        self.speech: SpeechInput | None = None
        self.speak = True
        self.voice: str | None = None
        self.turns = 0
        self.reply: Reply | None = None  # the newest reply (it may be over)
        self.speculation: tuple[str, Reply] | None = None  # a held reply to an eager transcript
        self.eager: str | None = None  # the STT's eager transcript of the utterance in progress
        self.paused = False  # the VAD's turn model heard the user pause since
        self.previous: Reply | None = None  # the one before: its playback report may still come
        self.prefilling: asyncio.Task[None] | None = None  # the user's words going into the LLM's cache

    # --- browser events ---------------------------------------------------------------------------

    async def on_audio(self, frame: bytes) -> None:
        if self.speech is None:
            await self.out.error("main-app", "no_session", "send a start event before audio")
        else:
            await self.speech.feed(frame)

    async def on_event(self, event: BrowserEvent) -> None:
        if isinstance(event, SessionStart):
            await self.begin(event)
        elif isinstance(event, SessionEnd):
            await self.close()
        elif self.conversation_id is None:
            await self.out.error("main-app", "no_session", f"send a start event before {event.type!r}")
        elif isinstance(event, UserText):
            await self.start_reply(event.text, "text", time.monotonic())
        elif isinstance(event, Interrupt):
            if self.reply is not None:
                await self.reply.interrupt()
        elif isinstance(event, Playback):
            for reply in (self.reply, self.previous):
                if reply is not None and reply.turn == event.turn:
                    await reply.on_playback(event.played_ms)
        elif isinstance(event, SessionConfigure):
            self.speak = self.speak if event.speak is None else event.speak
            self.voice = event.voice or self.voice

    async def begin(self, start: SessionStart) -> None:
        if self.conversation_id is not None:
            await self.out.error("main-app", "already_started", "the session is open; send configure to change it")
            return
        try:
            start.format.check()
            cid = await self.ctx.conversation(start.conversation_id, owner_of(self.socket))
        except AudioError as exc:
            await self.out.error("main-app", "unsupported_format", str(exc))
            return
        except ApiError as exc:
            await self.out.error("main-app", exc.code, exc.message)
            return
        self.conversation_id, self.speak, self.voice = cid, start.speak, start.voice
        c = self.ctx
        self.replies = ReplyContext(
            c.services, c.store, self.out, self.settings, cid, c.observe, self.reply_changed, c.generations
        )
        history = await self.ctx.store.messages(cid)
        output = AudioFormat(rate=self.settings.output_sample_rate)
        await self.out.send(SessionReady(conversation_id=cid, history=history, output_format=output))
        logger.info("session started: conversation %s", cid)
        self.speech = SpeechInput(self.ctx.services, self.settings, self.out, self, start.format, start.language)
        self.spawn(self.speech.run())

    async def on_close(self) -> None:
        self.out.closed = True
        await self.drop_speculation("the session ended")
        if self.reply is not None:
            await self.reply.close()
        if self.conversation_id is not None:
            logger.info("session ended: conversation %s", self.conversation_id)

    # --- turn-taking (called by SpeechInput) ------------------------------------------------------

    async def user_speaking(self) -> None:
        self.eager, self.paused = None, False
        await self.drop_speculation("the user went on")
        if self.reply is not None:
            await self.reply.interrupt()  # barge-in

    async def user_saying(self, text: str, eager: bool) -> None:
        """Speculation policy: start on the eager transcript once the VAD's turn model has heard a pause
        (so not on every short gap between words); drop it as soon as the transcript changes."""
        if self.speculation is not None and words(text) != words(self.speculation[0]):
            await self.drop_speculation("the transcript changed")
        if eager:
            self.eager = text
        elif self.eager is not None and words(text) != words(self.eager):
            self.eager, self.paused = None, False  # the user went on after the pause
        await self.maybe_speculate()
        if not eager:  # the eager transcript is the speculation's: at the end of speech the cores go to it
            self.maybe_prefill(text)

    def maybe_prefill(self, text: str) -> None:
        """Prefill policy: while the user speaks, have the LLM read the conversation and their words so
        far into this conversation's cache (a one-token generation, thrown away), so the reply evaluates
        only what changed since. On our 2 cores every prompt token costs ~17 ms: a 20-word question is
        ~400 ms before the first token, a history the cache lost far more. One at a time, only while the
        LLM has no reply to generate, never while a reply or a speculation runs."""
        if not (self.settings.prefill and words(text)) or self.speculation is not None:
            return
        if self.prefilling is not None and not self.prefilling.done():
            return  # the next interim brings the words this one is missing
        if self.reply is not None and self.reply.active:
            return
        if self.ctx.generations.running > self.settings.speculate_max_busy:
            return
        self.prefilling = self.spawn(self.prefill(text))

    async def prefill(self, text: str) -> None:
        assert self.conversation_id is not None
        history = await self.ctx.store.messages(self.conversation_id)
        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in history]
        messages.append(ChatMessage(role="user", content=text.strip()))
        request = llm_request(self.settings, messages, self.conversation_id, speculative=True)
        with contextlib.suppress(ServiceError):  # only a head start: the reply will say what went wrong
            async for _ in self.ctx.services.llm(request.model_copy(update={"max_tokens": 1})):
                pass
        self.ctx.prefilled()

    async def user_paused(self, complete: bool) -> None:
        self.paused = True
        await self.maybe_speculate()

    async def maybe_speculate(self) -> None:
        text = self.eager
        if not (self.settings.speculate and self.paused and text and words(text)) or self.speculation is not None:
            return
        if self.reply is not None and (self.reply.active or self.reply.is_echo(text)):
            return
        if self.ctx.generations.running > self.settings.speculate_max_busy:
            return  # the LLM is busy with real replies: a guess would only queue behind them, or delay them
        await self.speculate(text)

    async def user_said(self, text: str, ended_at: float) -> None:
        self.eager, self.paused = None, False
        if self.reply is not None and self.reply.is_echo(text):
            logger.info("session %s: dropped an echo of the assistant: %r", self.conversation_id, text)
            await self.drop_speculation("an echo")
            return
        if self.speculation is not None:
            guess, reply = self.speculation
            self.speculation = None
            if words(guess) == words(text):
                self.ctx.speculated("hit", 0)
                await self.start_reply(text, "voice", ended_at, speculated=reply)
                return
            self.ctx.speculated("miss", len(reply.text))
            await reply.discard()
        await self.start_reply(text, "voice", ended_at)

    async def speculate(self, text: str) -> None:
        """Start the reply to `text` before the turn has ended, held back until the final confirms it."""
        assert self.conversation_id is not None
        stored = await self.ctx.store.messages(self.conversation_id)
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in stored]
        history.append(ChatMessage(role="user", content=text.strip()))
        reply = self.new_reply("voice", time.monotonic(), history=history, held=True)  # numbered if confirmed
        self.speculation = (text, reply)
        reply.start(self.spawn)

    async def drop_speculation(self, why: str) -> None:
        if self.speculation is not None:
            _, reply = self.speculation
            self.speculation = None
            logger.debug("session %s: speculation dropped: %s", self.conversation_id, why)
            self.ctx.speculated("dropped", len(reply.text))
            await reply.discard()

    # --- replies ----------------------------------------------------------------------------------

    async def start_reply(self, text: str, source: str, t0: float, speculated: Reply | None = None) -> None:
        """The user's turn: stored, then answered; by `speculated`, the held reply that guessed it right."""
        assert self.conversation_id is not None
        if self.reply is not None:
            await self.reply.interrupt()
        self.turns += 1
        await self.ctx.store.add(self.conversation_id, "user", text.strip(), source, self.turns)
        reply = speculated or self.new_reply(source, t0)
        self.adopt(reply)
        if speculated is not None:
            await speculated.release(self.turns, t0)
        else:
            reply.start(self.spawn)

    def new_reply(self, source: str, t0: float, history: list[ChatMessage] | None = None, held: bool = False) -> Reply:
        assert self.replies is not None
        turn = 0 if held else self.turns  # a speculation gets its number when confirmed
        return Reply(self.replies, turn, source, t0, self.speak, self.voice, history=history, held=held)

    def adopt(self, reply: Reply) -> None:
        if reply.source == "voice":
            reply.mark("stt_final")
            if self.speech is not None and (verdict := self.speech.turn_end) is not None:
                reply.turn_probability, reply.turn_inference_ms = verdict.probability, verdict.inference_ms
        self.previous, self.reply = self.reply, reply

    async def reply_changed(self, reply: Reply) -> None:
        """Echo guard: the VAD listens less eagerly while the assistant speaks."""
        if reply is self.reply and self.speech is not None:
            await self.speech.set_speaking(reply.state is ReplyState.SPEAKING)
