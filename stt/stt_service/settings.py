from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from voice_common.settings import ServiceSettings


class SttSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STT_")

    port: int = 3002
    model: str = Field(
        "moonshine-base",
        description="a folder name under <models_dir>/stt: moonshine-base (English, fastest), whisper-tiny.en, "
        "whisper-base (multilingual, translation, word timestamps)",
    )
    model_path: Path | None = Field(
        None, description="any local CTranslate2 Whisper folder (or Moonshine ONNX folder); overrides `model`"
    )
    device: str = "cpu"
    compute_type: str = "int8"
    threads: int = 2
    beam_size: int = 1
    language: str | None = Field(None, description="default language; None = detect (English-only models: en)")
    vad_filter: bool = False
    interim_interval_ms: int = Field(500, ge=50, description="re-decode the growing utterance at most this often")
    commit_after_s: float = Field(4.0, description="commit stable segments once the uncommitted audio is this long")
    max_audio_s: float = 600.0
    max_concurrent: int = 2
    max_queue: int = 16

    @property
    def resolved_model_path(self) -> Path:
        return self.model_path or self.models_dir / "stt" / self.model
