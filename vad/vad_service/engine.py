"""Silero VAD on onnxruntime: one shared session, one small state per stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .onnx import onnx_session
from .turn import SmartTurn, TurnModel

logger = logging.getLogger(__name__)

RATE = 16000
WINDOW = 512  # samples at 16 kHz: 32 ms
CONTEXT = 64


@dataclass
class StreamState:
    """Recurrent state and audio context of one stream; never shared between streams."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, dtype=np.float32))


class VadEngine(Protocol):
    rate: int
    window: int
    name: str

    def probabilities(self, state: StreamState, samples: np.ndarray) -> list[float]:
        """Speech probability per window; len(samples) is a multiple of `window`."""
        ...


class SileroOnnx:
    rate = RATE
    window = WINDOW
    name = "silero-vad-6.2.3"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.session = onnx_session(path, threads)
        self._sr = np.array(RATE, dtype=np.int64)

    def probabilities(self, state: StreamState, samples: np.ndarray) -> list[float]:
        out: list[float] = []
        for i in range(0, len(samples), WINDOW):
            chunk = np.concatenate([state.context, samples[i : i + WINDOW]])[None, :]
            prob, state.state = self.session.run(None, {"input": chunk, "state": state.state, "sr": self._sr})
            state.context = chunk[0, -CONTEXT:]
            out.append(float(prob[0, 0]))
        return out


@dataclass
class VadModels:
    """What the VAD service loads: the voice detector, and the turn model when it is installed."""

    vad: VadEngine
    turn: TurnModel | None = None


def load_models(vad_path: Path, turn_path: Path, threads: int) -> VadModels:
    turn: TurnModel | None = None
    try:
        turn = SmartTurn(turn_path, threads)
    except FileNotFoundError as exc:  # detection still works; turn ends fall back to silence alone
        logger.warning("no turn model: %s", exc)
    return VadModels(SileroOnnx(vad_path, threads), turn)
