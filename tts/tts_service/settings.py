from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from voice_common.settings import ServiceSettings


class TtsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TTS_")

    port: int = 3003
    voices_dir: Path | None = Field(
        None, description="folder of piper *.onnx + *.onnx.json; default <models_dir>/tts/voices"
    )
    default_voice: str = "en_US-joe-medium"
    sample_rate: int | None = Field(None, description="output rate; None = the voice's own rate")
    length_scale: float = 1.0
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    threads: int = Field(0, description="cores a synthesis running alone may use (0 = all); concurrent ones use 1")
    max_concurrent: int = Field(2, description="syntheses at once; more wait, the most urgent first")
    max_queue: int = Field(64, description="syntheses waiting beyond max_concurrent; more are refused as busy")
    device: str = Field("cpu", description="cpu, or cuda (needs onnxruntime-gpu in the image)")
    max_chars: int = 4096
    first_words: int = Field(
        2,
        ge=1,
        description="words in a streamed reply's first piece when no punctuation comes sooner (fewer: audio "
        "starts sooner, each word ~50 ms of tokens and synthesis here; more: a more natural phrase)",
    )
    low_water_ms: int = Field(
        1200,
        ge=0,
        description="when a stream's listener has less audio than this left and nothing is being synthesised, "
        "the next piece is cut at a word boundary (2 x first_words) rather than at its sentence's end",
    )
    chunk_ms: int = Field(40, description="PCM frame size on the WebSocket")
    max_streams: int = 32

    @property
    def resolved_voices_dir(self) -> Path:
        return self.voices_dir or self.models_dir / "tts" / "voices"
