from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from voice_common.settings import ServiceSettings


class VadSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VAD_")

    port: int = 3001
    model_path: Path | None = Field(None, description="silero_vad.onnx; default <models_dir>/vad/silero_vad.onnx")
    threshold: float = Field(0.5, gt=0, lt=1)
    min_silence_ms: int = 300
    speech_pad_ms: int = 30
    min_speech_ms: int = 250
    max_streams: int = 64
    max_audio_s: float = Field(600.0, description="longest uploaded file; longer is refused from its header")
    threads: int = 1
    turn_model_path: Path | None = Field(
        None, description="smart-turn ONNX; default <models_dir>/vad/smart-turn-v3.2-cpu.onnx"
    )
    turn_threshold: float = Field(0.5, gt=0, lt=1, description="turn-complete probability that ends a turn sooner")
    turn_check_ms: int = Field(64, ge=32, description="silence after which the turn model is asked")
    turn_silence_ms: int = Field(200, ge=0, description="silence that ends a turn the model calls complete")
    max_pause_ms: int = Field(1500, ge=0, description="silence that ends a turn the model calls incomplete")

    @property
    def resolved_model_path(self) -> Path:
        return self.model_path or self.models_dir / "vad" / "silero_vad.onnx"

    @property
    def resolved_turn_model_path(self) -> Path:
        return self.turn_model_path or self.models_dir / "vad" / "smart-turn-v3.2-cpu.onnx"
