"""Semantic end of turn: smart-turn v3.2 (BSD-2-Clause, pipecat-ai) on onnxruntime.

The model hears the last 8 s of the user's turn as Whisper-style log-mel features and says how likely
the turn is complete: "I'd like to book a table for" is not, "for two at eight, please." is. The VAD
asks it when silence begins, so a finished sentence ends the turn after a short silence and a pause
mid-sentence does not cut the user off.

The features follow transformers' `WhisperFeatureExtractor(chunk_length=8)` with `do_normalize=True`, as
pipecat's numpy port of it does (waveform normalised, 400-point periodic Hann STFT, hop 160, 80 Slaney
mel bands up to 8 kHz, log10 with an 8-decade floor, scaled to about [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .onnx import onnx_session

RATE = 16000
SECONDS = 8
N_FFT, HOP, N_MELS = 400, 160, 80


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    mels = 3.0 * freq / 200.0
    high = freq >= 1000.0
    mels[high] = 15.0 + np.log(freq[high] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    high = mels >= 15.0
    freq[high] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[high] - 15.0))
    return freq


def _mel_filters() -> np.ndarray:
    """Slaney-normalised triangular filters, shape (N_FFT // 2 + 1, N_MELS)."""
    low, high = _hz_to_mel(np.array([0.0, RATE / 2]))
    edges = _mel_to_hz(np.linspace(low, high, N_MELS + 2))
    fft_freqs = np.linspace(0, RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    return np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges[2:] - edges[:-2]))[None, :]


MEL_FILTERS = _mel_filters()
WINDOW = np.hanning(N_FFT + 1)[:-1]


def log_mel(audio: np.ndarray) -> np.ndarray:
    """(80, 800) features of the last 8 s of 16 kHz audio, zero-padded at the front."""
    n = RATE * SECONDS
    x = np.asarray(audio[-n:], dtype=np.float32)
    x = np.pad(x, (n - len(x), 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * WINDOW, axis=-1)) ** 2  # (frames, bins)
    spec = np.log10(np.maximum(1e-10, power @ MEL_FILTERS)).T[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


class TurnModel(Protocol):
    def complete_probability(self, audio: np.ndarray) -> float:
        """How likely the turn in `audio` (16 kHz, ending now) is complete. Blocking."""
        ...


class SmartTurn:
    name = "smart-turn-v3.2"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.session = onnx_session(path, threads)

    def complete_probability(self, audio: np.ndarray) -> float:
        (logits,) = self.session.run(None, {"input_features": log_mel(audio)[None]})
        return float(np.asarray(logits).reshape(-1)[0])
