"""OpenAI's Realtime API (GA event names) on `WS /v1/realtime`, mapped onto the same session the browser
uses: VAD and STT on the appended audio, LLM, sentence TTS, barge-in, stored conversations.

A `RealtimeSession` is a `Session` that speaks another dialect at both ends: its client events become the
session's calls (`append` -> the mic path, `response.create` -> a reply, `response.cancel` -> interrupt,
`conversation.item.truncate` -> what was heard), and the session's own events are translated on their
way out (`deliver`): speech marks, the transcript, the reply's text and PCM16 audio at 24 kHz, `done`s.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import WebSocket
from pydantic import ConfigDict, Field
from voice_common.audio import AudioFormat
from voice_common.chat import estimate_tokens
from voice_common.protocol import (
    ErrorEvent,
    Event,
    Interrupted,
    ReplyAudioStart,
    ReplyDelta,
    ReplyDone,
    SessionReady,
    SessionStart,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    _adapter,
)
from voice_common.ws import send_text

from .session import Session

if TYPE_CHECKING:
    from .app import AppContext

RATE = 24000  # the API's audio/pcm: PCM16 mono at 24 kHz, in and out


class _ClientEvent(Event):
    model_config = ConfigDict(extra="ignore")
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: dict[str, Any] = Field(default_factory=dict)


class AudioAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class AudioCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    item: dict[str, Any]


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: dict[str, Any] | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]


class ItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = 0
    audio_end_ms: int


RealtimeEvent = (
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | ResponseCreate | ResponseCancel | ItemTruncate
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession(Session):
    events = _adapter(RealtimeEvent)
    subprotocol = "realtime"

    def __init__(self, socket: WebSocket, ctx: AppContext) -> None:
        super().__init__(socket, ctx)
        self.settings = ctx.settings.model_copy(update={"output_sample_rate": RATE})
        self.session_id = ""  # sess_<conversation id>, once the session has begun
        self.turn_detection: dict[str, Any] | None = {"type": "server_vad", "create_response": True}
        self.pending: tuple[str, str] | None = None  # (text, source) awaiting response.create
        self.input_item: str | None = None  # the user item being spoken
        self.heard_so_far = ""  # transcription deltas sent for it
        self.responses: dict[int, dict[str, Any]] = {}  # turn -> its response and item ids, and state
        self.audio_turn: int | None = None

    async def run(self) -> None:
        await self.begin(SessionStart(format=AudioFormat(rate=RATE), speak=True))
        await super().run()

    # --- client events ----------------------------------------------------------------------------

    async def on_event(self, event: Any) -> None:
        if isinstance(event, AudioAppend):
            try:
                pcm = base64.b64decode(event.audio, validate=True)
            except (binascii.Error, ValueError):
                await self.error("invalid_audio", "input_audio_buffer.append: audio is not base64")
                return
            await self.on_audio(pcm)
        elif isinstance(event, SessionUpdate):
            await self.update(event.session)
        elif isinstance(event, AudioCommit):
            if self.speech is not None:
                await self.speech.end_utterance()  # the client says the user's turn is over
        elif isinstance(event, AudioClear):
            await self.emit("input_audio_buffer.cleared")
        elif isinstance(event, ItemCreate):
            await self.create_item(event.item)
        elif isinstance(event, ResponseCreate):
            await self.create_response(event.response or {})
        elif isinstance(event, ResponseCancel):
            if self.reply is not None and self.reply.active:
                await self.reply.interrupt()
        elif isinstance(event, ItemTruncate):
            await self.truncate(event)

    async def update(self, changes: dict[str, Any]) -> None:
        if "instructions" in changes:
            self.settings = self.settings.model_copy(update={"system_prompt": changes["instructions"] or None})
            if self.replies is not None:
                self.replies.settings = self.settings
        if (modalities := changes.get("output_modalities")) is not None:
            self.speak = "audio" in modalities
        audio = changes.get("audio") or {}
        fmt = (audio.get("input") or {}).get("format") or {}
        if fmt and (fmt.get("type") != "audio/pcm" or int(fmt.get("rate", RATE)) != RATE):
            await self.error("unsupported_format", f"input audio must be audio/pcm at {RATE} Hz")
        if "turn_detection" in (audio.get("input") or {}):
            self.turn_detection = audio["input"]["turn_detection"]
        if voice := (audio.get("output") or {}).get("voice"):
            self.voice = voice
        await self.emit("session.updated", session=self.describe())

    async def create_item(self, item: dict[str, Any]) -> None:
        texts = [c.get("text") or c.get("transcript") or "" for c in item.get("content") or [] if isinstance(c, dict)]
        text = " ".join(t for t in texts if t).strip()
        if item.get("type", "message") != "message" or item.get("role") != "user" or not text:
            await self.error("unsupported_item", "conversation.item.create takes user messages with text")
            return
        item_id = item.get("id") or new_id("item")
        self.pending = (text, "text")
        content = [{"type": "input_text", "text": text}]
        message = {"id": item_id, "type": "message", "role": "user", "status": "completed", "content": content}
        await self.emit("conversation.item.added", item=message)
        await self.emit("conversation.item.done", item=message)

    async def create_response(self, options: dict[str, Any]) -> None:
        if (modalities := options.get("output_modalities")) is not None:
            self.speak = "audio" in modalities
        if self.pending is None:
            await self.error("nothing_to_answer", "response.create: no user message since the last response")
            return
        (text, source), self.pending = self.pending, None
        await self.start_reply(text, source, time.monotonic())

    async def truncate(self, event: ItemTruncate) -> None:
        for turn, ids in self.responses.items():
            if ids["item_id"] == event.item_id:
                for reply in (self.reply, self.previous):
                    if reply is not None and reply.turn == turn:
                        if reply.active:
                            await reply.interrupt()
                        await reply.on_playback(event.audio_end_ms)  # what was heard is what stays stored
                await self.emit(
                    "conversation.item.truncated",
                    item_id=event.item_id,
                    content_index=event.content_index,
                    audio_end_ms=event.audio_end_ms,
                )
                return
        await self.error("item_not_found", f"no assistant item {event.item_id!r}")

    # --- turn-taking: manual mode waits for response.create ---------------------------------------

    async def user_said(self, text: str, ended_at: float) -> None:
        if self.turn_detection is None or not self.turn_detection.get("create_response", True):
            self.pending = (text, "voice")
            return
        await super().user_said(text, ended_at)

    async def maybe_speculate(self) -> None:
        if self.turn_detection is not None:  # manual turns: nothing to guess
            await super().maybe_speculate()

    # --- the session's events, in the Realtime dialect --------------------------------------------

    async def emit(self, kind: str, **fields: Any) -> bool:
        return await send_text(self.socket, json.dumps({"type": kind, "event_id": new_id("event"), **fields}))

    async def deliver(self, event: Event) -> bool:
        if isinstance(event, SessionReady):
            self.session_id = f"sess_{event.conversation_id}"  # the stored conversation, for GET /conversations
            return await self.emit("session.created", session=self.describe())
        if isinstance(event, ErrorEvent):
            kind = (
                "server_error" if event.code in ("internal_error", "service_unavailable") else "invalid_request_error"
            )
            error = {"type": kind, "code": event.code, "message": event.message, "param": None, "event_id": None}
            return await self.emit("error", error=error)
        if isinstance(event, SpeechStarted):
            self.input_item, self.heard_so_far = new_id("item"), ""
            return await self.emit(
                "input_audio_buffer.speech_started", audio_start_ms=round(event.t_ms), item_id=self.input_item
            )
        if isinstance(event, SpeechStopped):
            return await self.emit(
                "input_audio_buffer.speech_stopped", audio_end_ms=round(event.t_ms), item_id=self.input_item
            )
        if isinstance(event, Transcript):
            return await self.transcript(event)
        if isinstance(event, ReplyAudioStart):
            self.audio_turn = event.turn
        elif isinstance(event, ReplyDelta):
            ids = await self.response_for(event.turn)
            kind = "response.output_audio_transcript.delta" if ids["audio"] else "response.output_text.delta"
            return await self.emit(kind, **self.where(ids), delta=event.text)
        elif isinstance(event, Interrupted | ReplyDone):
            await self.finish(event)
        return True  # metrics, service status: not part of the API

    async def send_audio(self, frame: bytes) -> bool:
        if self.audio_turn is None:
            return True
        ids = await self.response_for(self.audio_turn)
        return await self.emit("response.output_audio.delta", **self.where(ids), delta=base64.b64encode(frame).decode())

    async def transcript(self, event: Transcript) -> bool:
        item = self.input_item or new_id("item")
        if not event.final:  # ours are whole-text interims; the API's are deltas: send what extends it
            if event.text.startswith(self.heard_so_far) and len(event.text) > len(self.heard_so_far):
                delta, self.heard_so_far = event.text[len(self.heard_so_far) :], event.text
                return await self.emit(
                    "conversation.item.input_audio_transcription.delta", item_id=item, content_index=0, delta=delta
                )
            return True
        if not event.text:
            return True
        await self.emit("input_audio_buffer.committed", item_id=item, previous_item_id=None)
        content = [{"type": "input_audio", "transcript": event.text}]
        message = {"id": item, "type": "message", "role": "user", "status": "completed", "content": content}
        await self.emit("conversation.item.added", item=message)
        await self.emit("conversation.item.done", item=message)
        return await self.emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item,
            content_index=0,
            transcript=event.text,
        )

    async def response_for(self, turn: int) -> dict[str, Any]:
        """The ids of a turn's response, announcing it (created, item added, part added) the first time."""
        if turn in self.responses:
            return self.responses[turn]
        ids = {"response_id": new_id("resp"), "item_id": new_id("item"), "audio": self.speak, "done": False}
        self.responses[turn] = ids
        response = {"id": ids["response_id"], "object": "realtime.response", "status": "in_progress", "output": []}
        await self.emit("response.created", response=response)
        item = {"id": ids["item_id"], "object": "realtime.item", "type": "message", "role": "assistant"}
        await self.emit("response.output_item.added", response_id=ids["response_id"], output_index=0,
                        item={**item, "status": "in_progress", "content": []})  # fmt: skip
        part = {"type": "audio", "transcript": ""} if ids["audio"] else {"type": "text", "text": ""}
        await self.emit("response.content_part.added", **self.where(ids), part=part)
        return ids

    @staticmethod
    def where(ids: dict[str, Any]) -> dict[str, Any]:
        return {"response_id": ids["response_id"], "item_id": ids["item_id"], "output_index": 0, "content_index": 0}

    async def finish(self, event: Interrupted | ReplyDone) -> None:
        ids = await self.response_for(event.turn)
        if ids["done"]:
            return
        ids["done"] = True
        interrupted = isinstance(event, Interrupted) or event.interrupted
        text = event.heard_text if isinstance(event, Interrupted) else event.text
        where = self.where(ids)
        if ids["audio"]:
            await self.emit("response.output_audio.done", **where)
            await self.emit("response.output_audio_transcript.done", **where, transcript=text)
            part = {"type": "audio", "transcript": text}
        else:
            await self.emit("response.output_text.done", **where, text=text)
            part = {"type": "text", "text": text}
        await self.emit("response.content_part.done", **where, part=part)
        status = "incomplete" if interrupted else "completed"
        content = [{**part, "type": "output_audio" if ids["audio"] else "output_text"}]
        item = {"id": ids["item_id"], "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}  # fmt: skip
        await self.emit("response.output_item.done", response_id=ids["response_id"], output_index=0, item=item)
        tokens = estimate_tokens(text)  # main-app does not see the LLM's token counts; a safe estimate
        usage = {"total_tokens": tokens, "input_tokens": 0, "output_tokens": tokens}
        response = {"id": ids["response_id"], "object": "realtime.response", "output": [item], "usage": usage,
                    "status": "cancelled" if interrupted else "completed"}  # fmt: skip
        await self.emit("response.done", response=response)
        if self.audio_turn == event.turn:
            self.audio_turn = None

    def describe(self) -> dict[str, Any]:
        pcm = {"type": "audio/pcm", "rate": RATE}
        return {
            "id": self.session_id,
            "object": "realtime.session",
            "type": "realtime",
            "model": "voicechat",
            "instructions": self.settings.system_prompt or "",
            "output_modalities": ["audio"] if self.speak else ["text"],
            "audio": {
                "input": {"format": pcm, "turn_detection": self.turn_detection, "transcription": {"model": "whisper"}},
                "output": {"format": pcm, "voice": self.voice or self.settings.voice or "default"},
            },
        }
