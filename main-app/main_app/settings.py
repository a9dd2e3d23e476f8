from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from voice_common.settings import REPO_ROOT, ServiceSettings


class AppSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    port: int = 8000
    vad_url: str = "http://127.0.0.1:3001"
    stt_url: str = "http://127.0.0.1:3002"
    tts_url: str = "http://127.0.0.1:3003"
    llm_url: str = "http://127.0.0.1:3004"
    downstream_api_key: str | None = Field(None, description="sent to the four services when they require a key")
    data_dir: Path = REPO_ROOT / "data"
    database_url: str | None = Field(
        None,
        description="postgresql://user:password@host:5432/db keeps conversations in PostgreSQL, shared by "
        "main-app replicas; unset: SQLite in data_dir",
    )
    web_dir: Path = REPO_ROOT / "web"
    system_prompt: str | None = Field(None, description="overrides the LLM service's voice prompt")
    voice: str | None = None
    output_sample_rate: int = 22050
    history_tokens: int = 1500
    max_reply_tokens: int = 200
    temperature: float = 0.6
    end_of_turn_silence_ms: int = Field(300, description="VAD silence that ends the user's turn (no turn model)")
    turn_detection: bool = Field(True, description="semantic end of turn (the VAD's turn model)")
    turn_silence_ms: int = Field(200, description="silence that ends a turn the turn model calls complete")
    speculate: bool = Field(True, description="start the reply on the eager transcript, before the turn ends")
    prefill: bool = Field(True, description="read the user's words into the LLM's prompt cache while they speak")
    speculate_max_busy: int = Field(
        0, description="speculate only while at most this many replies are being generated (raise for a parallel LLM)"
    )
    max_turn_pause_ms: int = Field(1500, description="silence that ends a turn the turn model calls incomplete")
    vad_threshold: float = 0.5
    vad_threshold_speaking: float = Field(0.85, description="echo guard: VAD threshold while the assistant speaks")
    preroll_ms: int = 600
    playback_lead_ms: int = Field(250, description="how far ahead of real time reply audio may be sent")
    connect_timeout_s: float = 3.0
    stt_final_timeout_s: float = 10.0
    llm_first_token_timeout_s: float = 20.0
    tts_timeout_s: float = Field(10.0, description="the TTS owes audio (text or stop sent) and sends nothing")
    max_streams: int = Field(
        8,
        ge=1,
        description="live voice sessions; one more is refused as busy. The 2-core reference machine answers 4 "
        "at once in ~6 s and 8 in ~12 s (README benchmarks): raise it with a GPU host",
    )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "conversations.sqlite3"

    def ws_url(self, base: str, path: str = "/ws") -> str:
        return base.replace("https://", "wss://").replace("http://", "ws://") + path

    @property
    def downstream_headers(self) -> dict[str, str] | None:
        """The key goes in a header, never in the URL (URLs end up in access logs)."""
        return {"Authorization": f"Bearer {self.downstream_api_key}"} if self.downstream_api_key else None
