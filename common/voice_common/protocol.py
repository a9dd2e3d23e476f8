"""The wire protocol: every JSON frame on every WebSocket is one of these typed events.

Binary frames carry audio only; the audio format is declared by a start / audio_start event first.
One module so the services and main-app (their client) can never drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from .audio import AudioFormat


class Event(BaseModel):
    type: str

    def dump(self) -> str:
        return self.model_dump_json(exclude_none=True)


class ErrorEvent(Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    service: str | None = None
    fatal: bool = False


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


E = TypeVar("E")


def _adapter(union: Any) -> TypeAdapter[Any]:
    """A parser for a union of events, dispatched on their `type` field."""
    return TypeAdapter(Annotated[union, Field(discriminator="type")])


def parse_event(adapter: TypeAdapter[E], raw: str | bytes) -> E:
    """Parse one JSON text frame into a typed event, or raise ProtocolError with a readable message."""
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError("bad_event", f"invalid event ({where}): {first.get('msg')}") from None


# --- VAD -----------------------------------------------------------------------------------------


class VadStart(Event):
    type: Literal["start"] = "start"
    format: AudioFormat = AudioFormat()
    threshold: float | None = Field(None, gt=0, lt=1)
    min_silence_ms: int | None = Field(None, ge=0, le=10000)
    speech_pad_ms: int | None = Field(None, ge=0, le=2000)
    min_speech_ms: int | None = Field(None, ge=0, le=10000)
    probabilities: bool = False
    turn_detection: bool = Field(
        False, description="semantic end of turn: a complete sentence ends sooner, a pause mid-sentence later"
    )
    turn_silence_ms: int | None = Field(None, ge=0, le=10000, description="silence that ends a complete turn")
    max_pause_ms: int | None = Field(None, ge=0, le=10000, description="silence that ends an incomplete one")


class VadConfigure(Event):
    """Change thresholds mid-stream (main-app raises the threshold while the assistant speaks)."""

    type: Literal["configure"] = "configure"
    threshold: float | None = Field(None, gt=0, lt=1)
    min_silence_ms: int | None = Field(None, ge=0, le=10000)


class Stop(Event):
    type: Literal["stop"] = "stop"


class Cancel(Event):
    type: Literal["cancel"] = "cancel"


VadClientEvent = VadStart | VadConfigure | Stop
vad_client_events: TypeAdapter[VadClientEvent] = _adapter(VadClientEvent)


class VadReady(Event):
    """The stream is open: audio frames may follow."""

    type: Literal["ready"] = "ready"
    rate: int
    window_ms: float
    turn_detection: bool = False  # whether the turn model is on for this stream


class SpeechStarted(Event):
    type: Literal["speech_started"] = "speech_started"
    t_ms: float


class SpeechStopped(Event):
    type: Literal["speech_stopped"] = "speech_stopped"
    t_ms: float
    duration_ms: float


class TurnEnd(Event):
    """The turn model's verdict when silence begins (turn detection on): `complete` turns end after
    `turn_silence_ms` of silence, others only after `max_pause_ms` unless the user goes on."""

    type: Literal["turn_end"] = "turn_end"
    t_ms: float
    probability: float
    complete: bool
    inference_ms: float


class Probability(Event):
    type: Literal["probability"] = "probability"
    t_ms: float
    p: float


class Done(Event):
    type: Literal["done"] = "done"


VadServerEvent = VadReady | SpeechStarted | SpeechStopped | TurnEnd | Probability | Done | ErrorEvent
vad_server_events: TypeAdapter[VadServerEvent] = _adapter(VadServerEvent)


# --- STT -----------------------------------------------------------------------------------------


class SttStart(Event):
    """Start one utterance; frames follow, then stop (final transcript) or cancel (dropped)."""

    type: Literal["start"] = "start"
    format: AudioFormat = AudioFormat()
    language: str | None = None
    prompt: str | None = Field(None, max_length=1000, description="Whisper reads at most ~224 tokens of it")
    interim: bool = True


SttClientEvent = SttStart | Stop | Cancel
stt_client_events: TypeAdapter[SttClientEvent] = _adapter(SttClientEvent)


class SttReady(Event):
    """An utterance was started: its frames may follow."""

    type: Literal["ready"] = "ready"
    utterance: int


class Segment(BaseModel):
    start_ms: float
    end_ms: float
    text: str


class Interim(Event):
    type: Literal["interim"] = "interim"
    utterance: int
    text: str
    audio_ms: float
    eager: bool = False  # decoded at the first quiet frames: the final is likely this text


class Final(Event):
    type: Literal["final"] = "final"
    utterance: int
    text: str
    language: str | None = None
    duration_ms: float
    processing_ms: float
    segments: list[Segment] = []


class Cancelled(Event):
    type: Literal["cancelled"] = "cancelled"
    utterance: int | None = None


SttServerEvent = SttReady | Interim | Final | Cancelled | ErrorEvent
stt_server_events: TypeAdapter[SttServerEvent] = _adapter(SttServerEvent)


# --- TTS -----------------------------------------------------------------------------------------


class TtsStart(Event):
    """Open a synthesis stream; text pieces follow as the LLM produces them."""

    type: Literal["start"] = "start"
    voice: str | None = None
    sample_rate: int | None = Field(None, ge=8000, le=48000)
    speed: float = Field(1.0, ge=0.25, le=4.0)


class TtsText(Event):
    type: Literal["text"] = "text"
    text: str


class Flush(Event):
    type: Literal["flush"] = "flush"


TtsClientEvent = TtsStart | TtsText | Flush | Stop | Cancel
tts_client_events: TypeAdapter[TtsClientEvent] = _adapter(TtsClientEvent)


class AudioStart(Event):
    """The synthesis stream is open (TTS's ready): the format of the binary frames that follow."""

    type: Literal["audio_start"] = "audio_start"
    format: AudioFormat
    voice: str | None = None


class SentenceStart(Event):
    type: Literal["sentence_start"] = "sentence_start"
    index: int
    text: str


class SentenceEnd(Event):
    type: Literal["sentence_end"] = "sentence_end"
    index: int
    audio_ms: float


TtsServerEvent = AudioStart | SentenceStart | SentenceEnd | Done | Cancelled | ErrorEvent
tts_server_events: TypeAdapter[TtsServerEvent] = _adapter(TtsServerEvent)


# --- LLM -----------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """Body of POST /generate and of the WebSocket request event."""

    messages: list[ChatMessage]
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, le=8192)
    model: str | None = None
    stream: bool = False
    system_prompt: str | None = Field(
        None, description="replaces the service's voice system prompt when the messages carry none"
    )
    priority: float = Field(
        0.0, ge=0, description="scheduling priority when generations queue (voice_common.limits): 0 = someone waits"
    )
    prompt_cache_key: str | None = Field(
        None,
        max_length=200,
        description="e.g. the conversation id: requests with the same key reuse one cached prompt (OpenAI's name)",
    )


class LlmRequest(Event, GenerateRequest):
    type: Literal["request"] = "request"


LlmClientEvent = LlmRequest | Cancel
llm_client_events: TypeAdapter[LlmClientEvent] = _adapter(LlmClientEvent)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(BaseModel):
    first_token_ms: float | None = None
    total_ms: float = 0


class Token(Event):
    type: Literal["token"] = "token"
    text: str


class Thinking(Event):
    """A reasoning model's thoughts before its answer (Ollama with `think` on): shown, never spoken."""

    type: Literal["thinking"] = "thinking"
    text: str


class LlmDone(Event):
    type: Literal["done"] = "done"
    model: str
    usage: Usage
    timings: Timings
    finish_reason: str = "stop"


LlmServerEvent = Token | Thinking | LlmDone | Cancelled | ErrorEvent
llm_server_events: TypeAdapter[LlmServerEvent] = _adapter(LlmServerEvent)


# --- main-app <-> browser ------------------------------------------------------------------------


class SessionStart(Event):
    """Opens a session, once per connection; later changes go in `configure`."""

    type: Literal["start"] = "start"
    format: AudioFormat = AudioFormat()
    conversation_id: str | None = None
    voice: str | None = None
    language: str | None = None
    speak: bool = True


class UserText(Event):
    type: Literal["text"] = "text"
    text: str = Field(min_length=1, max_length=4000)


class Interrupt(Event):
    type: Literal["interrupt"] = "interrupt"


class Playback(Event):
    """How much of a reply's audio the client actually played (sent periodically and on interrupt)."""

    type: Literal["playback"] = "playback"
    turn: int
    played_ms: float = Field(ge=0)


class SessionConfigure(Event):
    """Mid-session changes; a field left out stays as it is. Applies from the next reply on."""

    type: Literal["configure"] = "configure"
    speak: bool | None = None
    voice: str | None = None


class SessionEnd(Event):
    type: Literal["end"] = "end"


BrowserEvent = SessionStart | SessionConfigure | UserText | Interrupt | Playback | SessionEnd
browser_events: TypeAdapter[BrowserEvent] = _adapter(BrowserEvent)


class SessionReady(Event):
    type: Literal["ready"] = "ready"
    conversation_id: str
    output_format: AudioFormat
    history: list[dict[str, Any]] = []


class Transcript(Event):
    type: Literal["transcript"] = "transcript"
    final: bool
    text: str
    turn: int | None = None


class ReplyDelta(Event):
    type: Literal["reply_delta"] = "reply_delta"
    turn: int
    text: str


class ReplyAudioStart(Event):
    type: Literal["audio_start"] = "audio_start"
    turn: int
    format: AudioFormat


class ReplyDone(Event):
    type: Literal["reply_done"] = "reply_done"
    turn: int
    text: str
    interrupted: bool = False


class Interrupted(Event):
    type: Literal["interrupted"] = "interrupted"
    turn: int
    heard_text: str = ""


class TurnMetrics(Event):
    """All from one clock (main-app's), in ms after the end of the user's speech (or the typed message)."""

    type: Literal["metrics"] = "metrics"
    turn: int
    source: Literal["voice", "text"]
    stt_final_ms: float | None = None
    llm_first_token_ms: float | None = None
    tts_first_audio_ms: float | None = None
    first_audio_sent_ms: float | None = None
    reply_done_ms: float | None = None
    speculative: bool = False  # the reply was started on the eager transcript, before the turn ended
    turn_probability: float | None = None  # the turn model's verdict that ended the turn
    turn_inference_ms: float | None = None


class ServiceStatus(Event):
    """A downstream service went down or came back (the UI shows it; the session goes on)."""

    type: Literal["service_status"] = "service_status"
    service: str
    status: Literal["ok", "down"]
