"""STT HTTP, OpenAI-compatible and WebSocket API."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import Counter, Histogram
from voice_common.app import create_service_app, engine_of
from voice_common.audio import AudioError, AudioTooLong, load_mono
from voice_common.errors import ApiError, error_body
from voice_common.limits import Limiter
from voice_common.sse import event_stream

from .engine import RATE, Seg, Transcriber, Transcript, check_language, load_transcriber
from .formats import openai_body
from .settings import SttSettings
from .streaming import SttStream

logger = logging.getLogger(__name__)
SERVICE = "stt"
MAX_PROMPT_CHARS = 1000
Engine = Annotated[Transcriber, Depends(engine_of)]


def decode_upload(data: bytes, max_seconds: float) -> np.ndarray:
    """soundfile first (WAV/FLAC/OGG; too long is refused from the header); PyAV (mp3, m4a, webm, ...) as
    the fallback (bounded by the request size limit)."""
    try:
        return load_mono(data, RATE, max_seconds)[0]
    except AudioTooLong:
        raise
    except AudioError:
        if not data:
            raise
    try:
        from faster_whisper.audio import decode_audio

        samples = decode_audio(io.BytesIO(data), sampling_rate=RATE)
    except Exception as exc:
        raise AudioError(f"could not decode audio: {exc}") from exc
    if samples.size == 0:
        raise AudioError("audio file has no samples")
    return np.asarray(samples, dtype=np.float32)


def create_app(settings: SttSettings | None = None, engine: Transcriber | None = None) -> FastAPI:
    settings = settings or SttSettings()
    app = create_service_app(
        name=SERVICE,
        settings=settings,
        load=lambda: load_transcriber(settings),
        engine=engine,
        info=lambda e: {
            "model": getattr(e, "name", settings.model),
            "model_path": str(settings.resolved_model_path),
            "multilingual": getattr(e, "multilingual", None),
            "audio_format": {"rate": RATE, "width": 2, "channels": 1},
            "device": settings.device,
            "compute_type": settings.compute_type,
            "beam_size": settings.beam_size,
        },
        stream=lambda socket, engine: SttStream(socket, engine, settings, limiter, decode_seconds),
    )
    limiter = Limiter(settings.max_concurrent, settings.max_queue)
    app.state.limiter = limiter
    decode_seconds = Histogram("stt_decode_duration_seconds", "decode time", ["kind"], registry=app.state.registry)
    audio_seconds = Counter("stt_audio_seconds", "audio transcribed", registry=app.state.registry)

    async def run_transcribe(
        engine: Transcriber,
        data: bytes,
        language: str | None,
        prompt: str | None,
        temperature: float | None = None,
        words: bool = False,
        task: str = "transcribe",
        on_segment: Callable[[Seg], None] | None = None,
    ) -> Transcript:
        language = check_language(language or settings.language, engine)
        if prompt and len(prompt) > MAX_PROMPT_CHARS:  # Whisper reads ~224 tokens; more only costs time
            raise ApiError(
                400, "prompt_too_long", f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
            )
        samples = await asyncio.to_thread(decode_upload, data, settings.max_audio_s)
        if len(samples) / RATE > settings.max_audio_s:
            raise ApiError(
                400,
                "audio_too_long",
                f"audio is {len(samples) / RATE:.0f} s; the limit is {settings.max_audio_s:.0f} s",
            )
        result = await limiter.run_in_thread(
            engine.transcribe,
            samples,
            language=language,
            prompt=prompt,
            temperature=temperature,
            word_timestamps=words,
            task=task,
            on_segment=on_segment,
        )
        decode_seconds.labels("file").observe(result.processing_ms / 1000)
        audio_seconds.inc(result.duration)
        return result

    @app.post("/transcribe")
    async def transcribe(
        engine: Engine,
        file: UploadFile = File(...),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        temperature: str | None = Form(None),
    ) -> dict[str, Any]:
        r = await run_transcribe(engine, await file.read(), language, prompt, check_temperature(temperature))
        return {
            "text": r.text,
            "language": r.language,
            "language_probability": r.language_probability,
            "duration_ms": round(r.duration * 1000, 1),
            "segments": [
                {"start_ms": round(s.start * 1000), "end_ms": round(s.end * 1000), "text": s.text} for s in r.segments
            ],
            "processing_ms": r.processing_ms,
        }

    async def openai_audio(request: Request, engine: Transcriber, task: str) -> Response:
        """OpenAI's transcriptions and translations: the same form, Whisper's two tasks."""
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_file", "multipart field 'file' is required")
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise ApiError(
                400, "invalid_response_format", f"response_format {fmt!r}: use json, text, verbose_json, srt, vtt"
            )
        granularities = [
            str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
        ]
        words = "word" in granularities
        language = _str(form.get("language")) if task == "transcribe" else None
        args = (engine, await upload.read(), language, _str(form.get("prompt")))
        temp = check_temperature(_str(form.get("temperature")))
        if str(form.get("stream") or "").lower() == "true" and task == "transcribe":
            return stream_transcript(run_transcribe, args, temp)
        r = await run_transcribe(*args, temp, words, task=task)
        body, media = openai_body(r, fmt, words, "segment" in granularities or not granularities)
        if isinstance(body, str):
            return PlainTextResponse(body, media_type=media)
        return JSONResponse(body)

    @app.post("/v1/audio/transcriptions")
    async def openai_transcriptions(request: Request, engine: Engine) -> Response:
        return await openai_audio(request, engine, "transcribe")

    @app.post("/v1/audio/translations")
    async def openai_translations(request: Request, engine: Engine) -> Response:
        """English text from speech in another language (needs a multilingual model)."""
        return await openai_audio(request, engine, "translate")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        name = getattr(app.state.slot.engine, "name", settings.model)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "voicechat"}]}

    return app


def _str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def check_temperature(value: str | None) -> float | None:
    """Whisper's sampling temperature, 0..1 as OpenAI's API has it; never inf or NaN."""
    if not value:
        return None
    try:
        temp = float(value)
    except ValueError:
        temp = float("nan")
    if not 0 <= temp <= 1:
        raise ApiError(400, "invalid_temperature", "temperature must be a number from 0 to 1")
    return temp


def stream_transcript(
    run: Callable[..., Awaitable[Transcript]], args: tuple[Any, ...], temperature: float | None
) -> Response:
    """OpenAI's streamed transcription: a `transcript.text.delta` per segment as Whisper decodes it
    (the decode runs in a worker thread, the segments cross to the loop), then `transcript.text.done`."""
    loop = asyncio.get_running_loop()
    segments: asyncio.Queue[Seg | None] = asyncio.Queue()  # at most one item per segment of a bounded file

    async def decode() -> Transcript:
        try:
            return await run(
                *args, temperature, on_segment=lambda seg: loop.call_soon_threadsafe(segments.put_nowait, seg)
            )
        finally:
            segments.put_nowait(None)

    async def events() -> AsyncIterator[dict[str, Any]]:
        task = asyncio.create_task(decode())
        try:
            first = True
            while (seg := await segments.get()) is not None:
                if seg.text:
                    yield {"type": "transcript.text.delta", "delta": seg.text if first else " " + seg.text}
                    first = False
            r = await task
            yield {"type": "transcript.text.done", "text": r.text}
        except ApiError as exc:
            yield {"type": "error", **error_body(exc.status, exc.code, exc.message)}
        finally:
            task.cancel()

    return event_stream(events(), done=False)
