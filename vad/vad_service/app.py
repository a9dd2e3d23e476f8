"""VAD HTTP + WebSocket API."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, UploadFile, WebSocket
from prometheus_client import Counter, Gauge
from voice_common.app import create_service_app, engine_of
from voice_common.audio import AudioError, AudioFormat, StreamResampler, load_mono, pcm_to_mono_float
from voice_common.errors import ApiError
from voice_common.protocol import (
    Done,
    Ready,
    Stop,
    VadConfigure,
    VadStart,
    vad_client_events,
)
from voice_common.ws import frames, send_error, send_event

from .engine import SileroOnnx, VadEngine
from .segmenter import Segmenter, SegmenterConfig
from .settings import VadSettings

logger = logging.getLogger(__name__)
SERVICE = "vad"
Engine = Annotated[VadEngine, Depends(engine_of)]


def _config(settings: VadSettings, **overrides: Any) -> SegmenterConfig:
    cfg = SegmenterConfig(
        threshold=settings.threshold,
        min_silence_ms=settings.min_silence_ms,
        speech_pad_ms=settings.speech_pad_ms,
        min_speech_ms=settings.min_speech_ms,
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg


def _segments_of(engine: VadEngine, samples: np.ndarray, cfg: SegmenterConfig) -> list[tuple[float, float]]:
    seg = Segmenter(engine, cfg)
    seg.feed(samples)
    seg.finish()
    return seg.segments


def create_app(settings: VadSettings | None = None, engine: VadEngine | None = None) -> FastAPI:
    settings = settings or VadSettings()
    app = create_service_app(
        name=SERVICE,
        settings=settings,
        load=lambda: SileroOnnx(settings.resolved_model_path, settings.threads),
        engine=engine,
        info=lambda e: {
            "model": getattr(e, "name", "silero-vad"),
            "model_path": str(settings.resolved_model_path),
            "audio_format": {"rate": 16000, "width": 2, "channels": 1, "window_samples": 512},
            "device": "cpu",
            "defaults": {
                "threshold": settings.threshold,
                "min_silence_ms": settings.min_silence_ms,
                "speech_pad_ms": settings.speech_pad_ms,
                "min_speech_ms": settings.min_speech_ms,
            },
        },
    )
    streams = Gauge("vad_streams", "open WebSocket streams", registry=app.state.registry)
    windows = Counter("vad_windows", "512-sample windows processed", registry=app.state.registry)
    limit = asyncio.Semaphore(settings.max_streams)

    async def detect_file(
        file: UploadFile,
        threshold: float | None,
        min_speech_ms: int | None,
        min_silence_ms: int | None,
        speech_pad_ms: int | None,
        engine: VadEngine,
    ) -> tuple[list[tuple[float, float]], float, int]:
        if threshold is not None and not 0 < threshold < 1:
            raise ApiError(400, "invalid_threshold", "threshold must be between 0 and 1")
        for name, value in (
            ("min_speech_ms", min_speech_ms),
            ("min_silence_ms", min_silence_ms),
            ("speech_pad_ms", speech_pad_ms),
        ):
            if value is not None and not 0 <= value <= 10000:
                raise ApiError(400, f"invalid_{name}", f"{name} must be between 0 and 10000")
        data = await file.read()
        samples, src_rate = await asyncio.to_thread(load_mono, data, engine.rate)
        cfg = _config(
            settings,
            threshold=threshold,
            min_speech_ms=min_speech_ms,
            min_silence_ms=min_silence_ms,
            speech_pad_ms=speech_pad_ms,
        )
        segments = await asyncio.to_thread(_segments_of, engine, samples, cfg)
        windows.inc(len(samples) // engine.window)
        return segments, len(samples) * 1000 / engine.rate, src_rate

    @app.post("/detect")
    async def detect(
        engine: Engine,
        file: UploadFile = File(...),
        threshold: float | None = Form(None),
        min_speech_ms: int | None = Form(None),
        min_silence_ms: int | None = Form(None),
        speech_pad_ms: int | None = Form(None),
    ) -> dict[str, Any]:
        segments, duration, rate = await detect_file(
            file, threshold, min_speech_ms, min_silence_ms, speech_pad_ms, engine
        )
        speech = sum(e - s for s, e in segments)
        return {
            "duration_ms": round(duration, 1),
            "sample_rate": rate,
            "segments": [{"start_ms": round(s, 1), "end_ms": round(e, 1)} for s, e in segments],
            "speech_ratio": round(speech / duration, 4) if duration else 0.0,
        }

    @app.post("/v1/audio/speech/timestamps")
    async def timestamps(
        engine: Engine,
        file: UploadFile = File(...),
        threshold: float | None = Form(None),
        min_speech_duration_ms: int | None = Form(None),
        min_silence_duration_ms: int | None = Form(None),
        speech_pad_ms: int | None = Form(None),
    ) -> list[dict[str, float]]:
        """speaches-compatible: [{"start", "end"}] in milliseconds."""
        segments, _, _ = await detect_file(
            file, threshold, min_speech_duration_ms, min_silence_duration_ms, speech_pad_ms, engine
        )
        return [{"start": round(s, 1), "end": round(e, 1)} for s, e in segments]

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        if not app.state.slot.ready:
            await send_error(socket, "not_ready", app.state.slot.reason, SERVICE, fatal=True)
            await socket.close(1013)
            return
        if limit.locked():
            await send_error(
                socket, "too_many_streams", f"limit of {settings.max_streams} streams reached", SERVICE, fatal=True
            )
            await socket.close(1013)
            return
        async with limit:
            streams.inc()
            try:
                await _serve_stream(socket, app.state.slot.get(), settings, windows)
            finally:
                streams.dec()

    return app


async def _serve_stream(socket: WebSocket, engine: VadEngine, settings: VadSettings, windows: Counter) -> None:
    """One connection: start -> PCM frames -> stop, any number of times; state dies with the socket."""
    seg: Segmenter | None = None
    fmt = AudioFormat()
    resampler = StreamResampler(16000, 16000)
    async for event in frames(socket, vad_client_events, SERVICE):
        if isinstance(event, bytes):
            if seg is None:
                await send_error(socket, "no_stream", "send a start event before audio frames", SERVICE)
                continue
            try:
                samples = resampler(pcm_to_mono_float(event, fmt))
            except AudioError as exc:
                await send_error(socket, "invalid_audio", str(exc), SERVICE)
                continue
            for detected in await asyncio.to_thread(seg.feed, samples):
                await send_event(socket, detected)
            windows.inc(len(samples) // engine.window)
        elif isinstance(event, VadStart):
            try:
                event.format.check()
            except AudioError as exc:
                await send_error(socket, "unsupported_format", str(exc), SERVICE)
                continue
            fmt = event.format
            resampler = StreamResampler(fmt.rate, engine.rate)
            seg = Segmenter(
                engine,
                _config(
                    settings,
                    threshold=event.threshold,
                    min_silence_ms=event.min_silence_ms,
                    speech_pad_ms=event.speech_pad_ms,
                    min_speech_ms=event.min_speech_ms,
                ),
            )
            seg.config.probabilities = event.probabilities
            await send_event(socket, Ready(info={"rate": engine.rate, "window_ms": engine.window * 1000 / engine.rate}))
        elif isinstance(event, VadConfigure):
            if seg is None:
                await send_error(socket, "no_stream", "send a start event first", SERVICE)
                continue
            if event.threshold is not None:
                seg.config.threshold = event.threshold
            if event.min_silence_ms is not None:
                seg.config.min_silence_ms = event.min_silence_ms
        elif isinstance(event, Stop):
            if seg is not None:
                for ev in seg.finish():
                    await send_event(socket, ev)
            seg = None
            await send_event(socket, Done())
    logger.debug("vad stream closed")
