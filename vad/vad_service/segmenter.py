"""Turns per-window speech probabilities into speech_started / speech_stopped events.

REST and WebSocket both run audio through this one class, so their segments are identical.
Hysteresis as in silero's own iterator: start above `threshold`, end after `min_silence_ms` below
`threshold - 0.15`; a start is only announced once it has lasted `min_speech_ms` (no false starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from voice_common.protocol import Event, Probability, SpeechStarted, SpeechStopped

from .engine import StreamState, VadEngine


@dataclass
class SegmenterConfig:
    threshold: float = 0.5
    min_silence_ms: int = 300
    speech_pad_ms: int = 30
    min_speech_ms: int = 250
    probabilities: bool = False


class Segmenter:
    def __init__(self, engine: VadEngine, config: SegmenterConfig) -> None:
        self.engine = engine
        self.config = config
        self.state = StreamState()
        self._pending = np.zeros(0, dtype=np.float32)
        self._window_ms = engine.window * 1000 / engine.rate
        self._windows = 0
        self._start: float | None = None  # raw start of the current candidate segment
        self._silence_from: float | None = None
        self._announced = False
        self._last_end = 0.0
        self.segments: list[tuple[float, float]] = []

    @property
    def now_ms(self) -> float:
        return self._windows * self._window_ms

    @property
    def in_speech(self) -> bool:
        return self._announced

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Blocking (runs the model): call from a worker thread."""
        buf = np.concatenate([self._pending, samples]) if self._pending.size else samples
        usable = len(buf) - len(buf) % self.engine.window
        self._pending = buf[usable:].copy()
        if not usable:
            return []
        events: list[Event] = []
        for p in self.engine.probabilities(self.state, buf[:usable]):
            events.extend(self._step(p))
        return events

    def _step(self, p: float) -> list[Event]:
        cfg = self.config
        t = self.now_ms
        self._windows += 1
        events: list[Event] = []
        if cfg.probabilities:
            events.append(Probability(t_ms=round(t, 1), p=round(p, 4)))
        if p >= cfg.threshold:
            self._silence_from = None
            if self._start is None:
                self._start = t
            if not self._announced and self.now_ms - self._start >= cfg.min_speech_ms:
                self._announced = True
                events.append(SpeechStarted(t_ms=round(self._padded_start(), 1)))
        elif self._start is not None and p < cfg.threshold - 0.15:
            if self._silence_from is None:
                self._silence_from = t
            if self.now_ms - self._silence_from >= cfg.min_silence_ms:
                events.extend(self._close(self._silence_from))
        return events

    def _padded_start(self) -> float:
        assert self._start is not None
        return max(self._last_end, self._start - self.config.speech_pad_ms)

    def _close(self, raw_end: float) -> list[Event]:
        events: list[Event] = []
        if self._announced:
            start = self._padded_start()
            end = min(self.now_ms, raw_end + self.config.speech_pad_ms)
            self.segments.append((start, end))
            self._last_end = end
            events.append(SpeechStopped(t_ms=round(end, 1), duration_ms=round(end - start, 1)))
        self._start = self._silence_from = None
        self._announced = False
        return events

    def finish(self) -> list[Event]:
        """End of stream: close an open segment at the last audio we saw."""
        if self._start is None:
            return []
        return self._close(self._silence_from if self._silence_from is not None else self.now_ms)
