"""VAD HTTP + WebSocket API."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, UploadFile, WebSocket
from prometheus_client import Counter
from voice_common.app import create_service_app, engine_of
from voice_common.audio import AudioError, AudioFormat, StreamResampler, load_mono, pcm_to_mono_float
from voice_common.errors import ApiError
from voice_common.protocol import Done, VadClientEvent, VadConfigure, VadReady, VadStart, vad_client_events
from voice_common.streams import StreamHandler

from .engine import VadEngine, VadModels, load_models
from .segmenter import Segmenter, SegmenterConfig
from .settings import VadSettings

logger = logging.getLogger(__name__)
SERVICE = "vad"
Models = Annotated[VadModels, Depends(engine_of)]


def _config(settings: VadSettings, **overrides: Any) -> SegmenterConfig:
    cfg = SegmenterConfig(
        threshold=settings.threshold,
        min_silence_ms=settings.min_silence_ms,
        speech_pad_ms=settings.speech_pad_ms,
        min_speech_ms=settings.min_speech_ms,
        turn_check_ms=settings.turn_check_ms,
        turn_silence_ms=settings.turn_silence_ms,
        max_pause_ms=settings.max_pause_ms,
        turn_threshold=settings.turn_threshold,
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


def create_app(settings: VadSettings | None = None, engine: VadModels | None = None) -> FastAPI:
    settings = settings or VadSettings()
    app = create_service_app(
        name=SERVICE,
        settings=settings,
        load=lambda: load_models(settings.resolved_model_path, settings.resolved_turn_model_path, settings.threads),
        engine=engine,
        info=lambda m: {
            "model": getattr(m.vad, "name", "silero-vad") if m else None,
            "model_path": str(settings.resolved_model_path),
            "turn_model": getattr(m.turn, "name", None) if m else None,
            "audio_format": {"rate": 16000, "width": 2, "channels": 1, "window_samples": 512},
            "device": "cpu",
            "defaults": {
                "threshold": settings.threshold,
                "min_silence_ms": settings.min_silence_ms,
                "speech_pad_ms": settings.speech_pad_ms,
                "min_speech_ms": settings.min_speech_ms,
                "turn_threshold": settings.turn_threshold,
                "turn_silence_ms": settings.turn_silence_ms,
                "max_pause_ms": settings.max_pause_ms,
            },
        },
        stream=lambda socket, models: VadStream(socket, models, settings, windows),
    )
    windows = Counter("vad_windows", "512-sample windows processed", registry=app.state.registry)

    async def detect_file(
        file: UploadFile,
        threshold: float | None,
        min_speech_ms: int | None,
        min_silence_ms: int | None,
        speech_pad_ms: int | None,
        models: VadModels,
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
        engine = models.vad
        samples, src_rate = await asyncio.to_thread(load_mono, data, engine.rate, settings.max_audio_s)
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
        models: Models,
        file: UploadFile = File(...),
        threshold: float | None = Form(None),
        min_speech_ms: int | None = Form(None),
        min_silence_ms: int | None = Form(None),
        speech_pad_ms: int | None = Form(None),
    ) -> dict[str, Any]:
        segments, duration, rate = await detect_file(
            file, threshold, min_speech_ms, min_silence_ms, speech_pad_ms, models
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
        models: Models,
        file: UploadFile = File(...),
        threshold: float | None = Form(None),
        min_speech_duration_ms: int | None = Form(None),
        min_silence_duration_ms: int | None = Form(None),
        speech_pad_ms: int | None = Form(None),
    ) -> list[dict[str, float]]:
        """speaches-compatible: [{"start", "end"}] in milliseconds."""
        segments, _, _ = await detect_file(
            file, threshold, min_speech_duration_ms, min_silence_duration_ms, speech_pad_ms, models
        )
        return [{"start": round(s, 1), "end": round(e, 1)} for s, e in segments]

    @app.post("/turn")
    async def turn(models: Models, file: UploadFile = File(...)) -> dict[str, Any]:
        """Is the turn in this audio complete? The last 8 s are what the model hears."""
        if models.turn is None:
            raise ApiError(503, "turn_model_unavailable", "no turn model installed: run `make models`")
        samples, _ = await asyncio.to_thread(load_mono, await file.read(), models.vad.rate, settings.max_audio_s)
        t0 = time.perf_counter()
        p = await asyncio.to_thread(models.turn.complete_probability, samples)
        return {
            "probability": round(p, 4),
            "complete": p >= settings.turn_threshold,
            "threshold": settings.turn_threshold,
            "inference_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    return app


class VadStream(StreamHandler[VadClientEvent]):
    """One connection: start -> PCM frames -> stop, any number of times; state dies with the socket.
    Frames are processed in order as they arrive (a window takes well under a millisecond)."""

    service = SERVICE
    events = vad_client_events

    def __init__(self, socket: WebSocket, models: VadModels, settings: VadSettings, windows: Counter) -> None:
        super().__init__(socket)
        self.engine = models.vad
        self.turn = models.turn
        self.settings = settings
        self.windows = windows
        self.seg: Segmenter | None = None
        self.fmt = AudioFormat()
        self.resampler = StreamResampler(self.engine.rate, self.engine.rate)

    async def on_audio(self, frame: bytes) -> None:
        if self.seg is None:
            await self.error("no_stream", "send a start event before audio frames")
            return
        try:
            samples = self.resampler(pcm_to_mono_float(frame, self.fmt))
        except AudioError as exc:
            await self.error("invalid_audio", str(exc))
            return
        for detected in await asyncio.to_thread(self.seg.feed, samples):
            await self.send(detected)
        self.windows.inc(len(samples) // self.engine.window)

    async def on_event(self, event: VadClientEvent) -> None:
        if isinstance(event, VadStart):
            try:
                event.format.check()
            except AudioError as exc:
                await self.error("unsupported_format", str(exc))
                return
            self.fmt = event.format
            self.resampler = StreamResampler(event.format.rate, self.engine.rate)
            cfg = _config(
                self.settings,
                threshold=event.threshold,
                min_silence_ms=event.min_silence_ms,
                speech_pad_ms=event.speech_pad_ms,
                min_speech_ms=event.min_speech_ms,
                turn_silence_ms=event.turn_silence_ms,
                max_pause_ms=event.max_pause_ms,
            )
            cfg.probabilities = event.probabilities
            cfg.turn_detection = event.turn_detection and self.turn is not None
            self.seg = Segmenter(self.engine, cfg, self.turn)
            window_ms = self.engine.window * 1000 / self.engine.rate
            await self.send(VadReady(rate=self.engine.rate, window_ms=window_ms, turn_detection=cfg.turn_detection))
        elif self.seg is None:
            await self.error("no_stream", "send a start event first")
        elif isinstance(event, VadConfigure):
            if event.threshold is not None:
                self.seg.config.threshold = event.threshold
            if event.min_silence_ms is not None:
                self.seg.config.min_silence_ms = event.min_silence_ms
        else:  # stop
            for detected in self.seg.finish():
                await self.send(detected)
            self.seg = None
            await self.send(Done())
