"""The Transcriber protocol and its faster-whisper implementation (blocking: call from a thread)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from voice_common.errors import ApiError

if TYPE_CHECKING:
    from .settings import SttSettings

RATE = 16000


class Superseded(Exception):
    """The caller set the decode's `stop` event: a newer decode of the same audio made it pointless."""


@dataclass
class Word:
    start: float
    end: float
    word: str


@dataclass
class Seg:
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[Seg]
    processing_ms: float


class Transcriber(Protocol):
    name: str
    multilingual: bool

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        word_timestamps: bool = False,
        timestamps: bool = True,
        task: str = "transcribe",
        on_segment: Callable[[Seg], None] | None = None,
        stop: threading.Event | None = None,
        draft: Transcript | None = None,
    ) -> Transcript:
        """`timestamps=False` skips Whisper's timestamp tokens (~15% faster); segments then span the audio.
        `task="translate"`: English text from speech in any language (multilingual models). `on_segment`
        is called with each segment as it is decoded (in this thread), for streamed transcripts. When
        `stop` is set the decode gives up early (raising `Superseded`), so its cores go to the newer one.
        `draft`: an earlier decode of this audio's beginning (a live utterance's interim), whose tokens a
        transcriber may check rather than generate again (Moonshine does; Whisper ignores it)."""
        ...


class FasterWhisper:
    def __init__(
        self, path: Path, device: str, compute_type: str, threads: int, beam_size: int, vad_filter: bool, workers: int
    ) -> None:
        # CTranslate2's OpenMP threads sleep when idle instead of spinning (read when it is first imported):
        # between decodes the spin would take the cores the VAD, TTS and LLM of other turns need
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from faster_whisper import WhisperModel

        if not (path / "model.bin").exists():
            raise FileNotFoundError(f"no CTranslate2 Whisper model in {path}: run `make models`")
        self.name = path.name
        self.model = WhisperModel(
            str(path),
            device=device,
            compute_type=compute_type,
            cpu_threads=threads,
            num_workers=workers,
            local_files_only=True,
        )
        self.multilingual = bool(self.model.model.is_multilingual)
        self.beam_size = beam_size
        self.vad_filter = vad_filter

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        word_timestamps: bool = False,
        timestamps: bool = True,
        task: str = "transcribe",
        on_segment: Callable[[Seg], None] | None = None,
        stop: threading.Event | None = None,
        draft: Transcript | None = None,
    ) -> Transcript:
        t0 = time.perf_counter()
        check_task(self, task)
        check_stop(stop)
        if not self.multilingual:
            language = "en"
        segments, info = self.model.transcribe(
            audio,
            language=language,
            initial_prompt=prompt or None,
            beam_size=self.beam_size,
            temperature=temperature if temperature is not None else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            word_timestamps=word_timestamps,
            without_timestamps=not timestamps and not word_timestamps,
            vad_filter=self.vad_filter,
            condition_on_previous_text=False,
            task=task,
        )
        # The generator is lazy: consuming it here keeps the decoding in this worker thread.
        segs = []
        for s in segments:
            check_stop(stop)
            seg = Seg(
                s.start,
                s.end,
                s.text.strip(),
                s.avg_logprob,
                s.no_speech_prob,
                s.compression_ratio,
                s.temperature,
                list(s.tokens),
                [Word(w.start, w.end, w.word) for w in s.words or []],
            )
            segs.append(seg)
            if on_segment is not None:
                on_segment(seg)
        return Transcript(
            text=" ".join(s.text for s in segs if s.text).strip(),
            language=info.language,
            language_probability=round(float(info.language_probability), 4),
            duration=len(audio) / RATE,
            segments=segs,
            processing_ms=round((time.perf_counter() - t0) * 1000, 1),
        )


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Superseded


def check_task(engine: Transcriber, task: str) -> None:
    if task == "translate" and not engine.multilingual:
        raise ApiError(
            400,
            "translation_unsupported",
            f"{engine.name} is English-only; translation needs a multilingual model, e.g. STT_MODEL=whisper-base",
        )


def load_transcriber(settings: SttSettings) -> Transcriber:
    """The engine the model folder holds: Moonshine's ONNX files or a CTranslate2 Whisper."""
    path = settings.resolved_model_path
    if (path / "encoder.onnx").exists():
        from .moonshine import Moonshine

        return Moonshine(path, settings.threads)
    return FasterWhisper(
        path,
        settings.device,
        settings.compute_type,
        settings.threads,
        settings.beam_size,
        settings.vad_filter,
        settings.max_concurrent,
    )


def check_language(language: str | None, engine: Transcriber) -> str | None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    if not language:
        return None
    language = language.lower()
    if language not in _LANGUAGE_CODES:
        raise ApiError(400, "invalid_language", f"unknown language code {language!r}: use ISO 639-1, e.g. 'en', 'fr'")
    if not engine.multilingual and language != "en":
        raise ApiError(
            400,
            "unsupported_language",
            f"model {engine.name} is English-only; set STT_MODEL=whisper-base for {language!r}",
        )
    return language
