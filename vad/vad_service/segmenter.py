"""Turns per-window speech probabilities into speech_started / speech_stopped events.

REST and WebSocket both run audio through this one class, so their segments are identical.
Hysteresis as in silero's own iterator: start above `threshold`, end after `min_silence_ms` below
`threshold - 0.15`; a start is only announced once it has lasted `min_speech_ms` (no false starts).

With a turn model and `turn_detection`, the silence that ends a segment depends on what was said: at
`turn_check_ms` of silence the model hears the turn (a `turn_end` event with its verdict); a complete
turn ends at `turn_silence_ms`, an incomplete one at `max_pause_ms`, unless the user goes on first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from voice_common.protocol import Event, Probability, SpeechStarted, SpeechStopped, TurnEnd

from .engine import StreamState, VadEngine
from .turn import SECONDS, TurnModel

PRE_SPEECH_MS = 500  # the turn model hears this much before the segment's start


@dataclass
class SegmenterConfig:
    threshold: float = 0.5
    min_silence_ms: int = 300
    speech_pad_ms: int = 30
    min_speech_ms: int = 250
    probabilities: bool = False
    turn_detection: bool = False
    turn_check_ms: int = 64
    turn_silence_ms: int = 200
    max_pause_ms: int = 1500
    turn_threshold: float = 0.5


class Segmenter:
    def __init__(self, engine: VadEngine, config: SegmenterConfig, turn: TurnModel | None = None) -> None:
        self.engine = engine
        self.config = config
        self.turn = turn
        self._recent: deque[np.ndarray] = deque()  # the last SECONDS of audio, window by window
        self._verdict: bool | None = None  # the turn model's, for the current silence
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
        w = self.engine.window
        for i, p in enumerate(self.engine.probabilities(self.state, buf[:usable])):
            if self.turn_on:
                self._recent.append(buf[i * w : (i + 1) * w])
                if len(self._recent) * w > SECONDS * self.engine.rate:
                    self._recent.popleft()
            events.extend(self._step(p))
        return events

    @property
    def turn_on(self) -> bool:
        return self.turn is not None and self.config.turn_detection

    def _end_silence_ms(self, silence_ms: float, events: list[Event]) -> float:
        """The silence that ends the current segment, asking the turn model once per silence."""
        cfg = self.config
        if not self.turn_on or not self._announced:
            return cfg.min_silence_ms
        if self._verdict is None and silence_ms >= cfg.turn_check_ms:
            assert self.turn is not None and self._start is not None
            keep = int((self.now_ms - self._start + PRE_SPEECH_MS) * self.engine.rate / 1000) // self.engine.window
            audio = np.concatenate(list(self._recent)[-keep:])
            t0 = time.perf_counter()
            p = self.turn.complete_probability(audio)
            self._verdict = p >= cfg.turn_threshold
            events.append(
                TurnEnd(
                    t_ms=round(self.now_ms, 1),
                    probability=round(p, 4),
                    complete=self._verdict,
                    inference_ms=round((time.perf_counter() - t0) * 1000, 1),
                )
            )
        return cfg.turn_silence_ms if self._verdict else cfg.max_pause_ms

    def _step(self, p: float) -> list[Event]:
        cfg = self.config
        t = self.now_ms
        self._windows += 1
        events: list[Event] = []
        if cfg.probabilities:
            events.append(Probability(t_ms=round(t, 1), p=round(p, 4)))
        if p >= cfg.threshold:
            self._silence_from = None
            self._verdict = None
            if self._start is None:
                self._start = t
            if not self._announced and self.now_ms - self._start >= cfg.min_speech_ms:
                self._announced = True
                events.append(SpeechStarted(t_ms=round(self._padded_start(), 1)))
        elif self._start is not None and p < cfg.threshold - 0.15:
            if self._silence_from is None:
                self._silence_from = t
            silence = self.now_ms - self._silence_from
            if silence >= self._end_silence_ms(silence, events):
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
        self._verdict = None
        return events

    def finish(self) -> list[Event]:
        """End of stream: close an open segment at the last audio we saw."""
        if self._start is None:
            return []
        return self._close(self._silence_from if self._silence_from is not None else self.now_ms)
