"""TTS HTTP, OpenAI-compatible and WebSocket API."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Histogram
from pydantic import BaseModel, Field
from voice_common.app import create_service_app, engine_of
from voice_common.audio import StreamEncoder, encode_audio, float32_to_pcm16, resample
from voice_common.errors import ApiError
from voice_common.limits import URGENT, Limiter
from voice_common.sse import event_stream

from .engine import PiperEngine, Scheduler, Synthesizer
from .settings import TtsSettings
from .streaming import TtsStream
from .text import clean_for_speech, split_sentences

logger = logging.getLogger(__name__)
SERVICE = "tts"
Engine = Annotated[Synthesizer, Depends(engine_of)]
MEDIA = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm": "audio/pcm",
}


def audio_delta(data: bytes) -> dict[str, Any]:
    return {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}


def speech_done(text: str) -> dict[str, Any]:
    words = len(text.split())
    return {"type": "speech.audio.done", "usage": {"input_tokens": words, "output_tokens": 0, "total_tokens": words}}


class SynthesizeRequest(BaseModel):
    text: str
    voice: str | None = None
    return_format: Literal["wav", "base64", "pcm"] = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    sample_rate: int | None = Field(None, ge=8000, le=48000)


class SpeechRequest(BaseModel):
    """OpenAI's POST /v1/audio/speech body."""

    model: str = "tts-1"
    input: str
    voice: str = "alloy"
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None


def create_app(settings: TtsSettings | None = None, engine: Synthesizer | None = None) -> FastAPI:
    settings = settings or TtsSettings()
    app = create_service_app(
        name=SERVICE,
        settings=settings,
        load=lambda: PiperEngine(
            settings.resolved_voices_dir,
            settings.default_voice,
            settings.threads,
            settings.length_scale,
            settings.noise_scale,
            settings.noise_w_scale,
            settings.device,
        ),
        engine=engine,
        info=lambda e: {
            "model": "piper-tts-1.8.0",
            "voices": list(getattr(e, "voices", {})),
            "default_voice": getattr(e, "default_voice", settings.default_voice),
            "audio_format": {"rate": settings.sample_rate or "voice", "width": 2, "channels": 1},
            "device": settings.device,
        },
        stream=lambda socket, engine: TtsStream(socket, engine, settings, scheduler),
    )
    synth_seconds = Histogram(
        "tts_synthesis_duration_seconds", "time to synthesize one sentence", registry=app.state.registry
    )
    scheduler = Scheduler(Limiter(settings.max_concurrent, settings.max_queue), synth_seconds)

    def check_text(text: str) -> str:
        if not text.strip():
            raise ApiError(400, "empty_text", "text is empty")
        if len(text) > settings.max_chars:
            raise ApiError(400, "text_too_long", f"text is {len(text)} characters; the limit is {settings.max_chars}")
        if not clean_for_speech(text).strip(" .,!?;:-"):
            raise ApiError(400, "empty_text", "text has nothing speakable")
        return text

    async def sentences_audio(
        engine: Synthesizer, text: str, voice: str, speed: float, rate: int
    ) -> AsyncIterator[np.ndarray]:
        src = engine.voices[voice].sample_rate
        # a short first piece: audio starts sooner. A REST caller waits for every piece, so each is urgent.
        for sentence in split_sentences(text, eager_first=True):
            parts = await scheduler.synthesize(engine, sentence, voice, speed, URGENT)
            for part in parts:
                yield resample(part, src, rate)

    async def render(engine: Synthesizer, text: str, voice: str, speed: float, rate: int) -> np.ndarray:
        parts = [p async for p in sentences_audio(engine, text, voice, speed, rate)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @app.post("/synthesize")
    async def synthesize(req: SynthesizeRequest, engine: Engine) -> Response:
        text = check_text(req.text)
        voice = engine.resolve(req.voice)
        rate = req.sample_rate or settings.sample_rate or engine.voices[voice].sample_rate
        audio = await render(engine, text, voice, req.speed, rate)
        headers = {"X-Voice": voice, "X-Sample-Rate": str(rate), "X-Duration-Ms": f"{len(audio) * 1000 / rate:.0f}"}
        if req.return_format == "pcm":
            headers.update({"X-Sample-Width": "2", "X-Channels": "1"})
            return Response(float32_to_pcm16(audio), media_type="audio/pcm", headers=headers)
        wav = encode_audio(audio, rate, "wav")
        if req.return_format == "wav":
            return Response(wav, media_type="audio/wav", headers=headers)
        body = {
            "audio": base64.b64encode(wav).decode(),
            "encoding": "wav",
            "voice": voice,
            "sample_rate": rate,
            "duration_ms": round(len(audio) * 1000 / rate),
        }
        return Response(json.dumps(body), media_type="application/json", headers=headers)

    @app.get("/voices")
    async def voices(engine: Engine) -> dict[str, Any]:
        return {"default": engine.default_voice, "voices": [v.as_dict() for v in engine.voices.values()]}

    @app.post("/v1/audio/speech")
    async def speech(req: SpeechRequest, engine: Engine) -> Response:
        """Every format streams sentence by sentence (mp3, opus, aac and wav encoded incrementally)
        except flac, which is rendered whole (see `StreamEncoder`)."""
        text = check_text(req.input)
        voice = engine.resolve(req.voice)
        fmt = req.response_format
        rate = 24000 if fmt == "pcm" else settings.sample_rate or engine.voices[voice].sample_rate
        if fmt == "flac":
            audio = await render(engine, text, voice, req.speed, rate)
            data = await asyncio.to_thread(encode_audio, audio, rate, fmt)
            if req.stream_format == "sse":

                async def whole() -> AsyncIterator[dict[str, Any]]:
                    yield audio_delta(data)
                    yield speech_done(text)

                return event_stream(whole(), done=False)
            return Response(data, media_type=MEDIA[fmt])

        async def encoded() -> AsyncIterator[bytes]:
            encoder = StreamEncoder(fmt, rate) if fmt != "pcm" else None
            async for part in sentences_audio(engine, text, voice, req.speed, rate):
                data = float32_to_pcm16(part) if encoder is None else await asyncio.to_thread(encoder.encode, part)
                if data:
                    yield data
            if encoder is not None and (tail := await asyncio.to_thread(encoder.close)):
                yield tail

        if req.stream_format == "sse":

            async def events() -> AsyncIterator[dict[str, Any]]:
                async for data in encoded():
                    yield audio_delta(data)
                yield speech_done(text)

            return event_stream(events(), done=False)
        headers = {"X-Sample-Rate": str(rate)} if fmt == "pcm" else {}
        return StreamingResponse(encoded(), media_type=MEDIA[fmt], headers=headers)

    return app
