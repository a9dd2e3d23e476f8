"""The Synthesizer protocol and its piper implementation (blocking: call from a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import Histogram
from voice_common.errors import ApiError
from voice_common.limits import Limiter

OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str
    sample_rate: int
    speakers: list[str]
    quality: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "language": self.language,
            "sample_rate": self.sample_rate,
            "speakers": self.speakers,
            "quality": self.quality,
        }


class Synthesizer(Protocol):
    voices: dict[str, VoiceInfo]
    default_voice: str

    def resolve(self, alias: str | None) -> str: ...

    def synthesize(self, text: str, voice: str, speed: float = 1.0, alone: bool = False) -> list[np.ndarray]:
        """Mono float32 at the voice's rate, one array per sentence piper found in `text`. `alone`: no
        other synthesis runs, so this one may use every core it was configured for (see `Scheduler`)."""
        ...


class Scheduler:
    """Every synthesis of the service goes through here: at most `limiter.concurrent` at once, the most
    urgent first (voice_common.limits' policy), and a synthesis that runs alone may use every core while
    concurrent ones get one each, so a lone reply is as fast as the machine allows and many share it
    without oversubscribing."""

    def __init__(self, limiter: Limiter, seconds: Histogram) -> None:
        self.limiter = limiter
        self.seconds = seconds
        self.trimming: asyncio.Future[None] | None = None

    async def synthesize(
        self, engine: Synthesizer, text: str, voice: str, speed: float, priority: float
    ) -> list[np.ndarray]:
        async with self.limiter.slot(priority):
            with self.seconds.time():
                audio = await asyncio.to_thread(engine.synthesize, text, voice, speed, self.limiter.alone)
        if self.limiter.active == 0 and (self.trimming is None or self.trimming.done()):
            # idle now: hand the freed heap back in the background (~20 ms, off every caller's path)
            self.trimming = asyncio.get_running_loop().run_in_executor(None, release_heap)
        return audio


def release_heap() -> None:
    """Give freed memory back to the OS. glibc keeps it otherwise, and every sentence has another length:
    a soak saw piper's process swing by hundreds of MB (in a loop of syntheses, 505 -> 885 MB; trimmed when
    idle, flat at ~240 MB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _voice_info(config_path: Path) -> VoiceInfo:
    cfg = json.loads(config_path.read_text())
    lang = cfg.get("language", {})
    return VoiceInfo(
        name=config_path.name.removesuffix(".onnx.json"),
        language=lang.get("code") or cfg.get("espeak", {}).get("voice", "unknown"),
        sample_rate=int(cfg["audio"]["sample_rate"]),
        speakers=sorted(cfg.get("speaker_id_map", {}), key=lambda s: cfg["speaker_id_map"][s]),
        quality=cfg["audio"].get("quality"),
    )


class PiperEngine:
    def __init__(
        self,
        voices_dir: Path,
        default_voice: str,
        threads: int,
        length_scale: float,
        noise_scale: float | None,
        noise_w_scale: float | None,
        device: str = "cpu",
    ) -> None:
        self.voices_dir = voices_dir
        self.voices = {v.name: v for v in (_voice_info(p) for p in sorted(voices_dir.glob("*.onnx.json")))}
        if not self.voices:
            raise FileNotFoundError(f"no piper voices (*.onnx + *.onnx.json) in {voices_dir}: run `make models`")
        self.default_voice = default_voice if default_voice in self.voices else next(iter(self.voices))
        self.threads = threads or os.cpu_count() or 1
        self.length_scale = length_scale
        self.noise_scale = noise_scale
        self.noise_w_scale = noise_w_scale
        self.providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        )
        self._loaded: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        for n in {1, self.threads}:
            self._load(self.default_voice, n)

    def _load(self, name: str, threads: int) -> Any:
        """One onnxruntime session per voice and thread count (its threads are fixed at creation)."""
        with self._lock:
            if (name, threads) not in self._loaded:
                import onnxruntime as ort
                from piper import PiperVoice
                from piper.config import PiperConfig

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                # idle pool threads sleep instead of spinning: on a shared machine the spin would take the
                # cores the STT and LLM need between two piper runs
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # every sentence has another length: onnxruntime's arena keeps each size it has seen and
                # grows for hours (a soak measured +500 MB); plain malloc gives the memory back
                opts.enable_cpu_mem_arena = False
                model = self.voices_dir / f"{name}.onnx"
                config = json.loads((self.voices_dir / f"{name}.onnx.json").read_text())
                session = ort.InferenceSession(str(model), sess_options=opts, providers=self.providers)
                self._loaded[name, threads] = PiperVoice(config=PiperConfig.from_dict(config), session=session)
            return self._loaded[name, threads]

    def resolve(self, alias: str | None) -> str:
        """Exact name, then a unique prefix/substring, then the language of an alias like `en_female`,
        then OpenAI's voice names -> the default voice; otherwise a 400 that lists what is installed."""
        if not alias:
            return self.default_voice
        if alias in self.voices:
            return alias
        low = alias.lower()
        matches = [n for n in self.voices if low in n.lower()]
        if matches:
            return matches[0]
        lang = low.replace("-", "_").split("_")[0]
        by_lang = [n for n, v in self.voices.items() if v.language.lower().startswith(lang)]
        if len(lang) == 2 and by_lang:
            return self.default_voice if self.default_voice in by_lang else by_lang[0]
        if low in OPENAI_VOICES:
            return self.default_voice
        raise ApiError(400, "unknown_voice", f"unknown voice {alias!r}; installed: {', '.join(self.voices)}")

    def synthesize(self, text: str, voice: str, speed: float = 1.0, alone: bool = False) -> list[np.ndarray]:
        from piper.config import SynthesisConfig

        piper_voice = self._load(voice, self.threads if alone else 1)
        config = SynthesisConfig(
            length_scale=self.length_scale / speed, noise_scale=self.noise_scale, noise_w_scale=self.noise_w_scale
        )
        return [chunk.audio_float_array for chunk in piper_voice.synthesize(text, syn_config=config)]
