"""Settings base: every service reads its own env prefix (VAD_, STT_, ...) and an optional .env file."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_models_dir() -> Path:
    """MODELS_DIR wins; otherwise the repo's models/ folder that `make models` fills."""
    return Path(os.environ.get("MODELS_DIR") or REPO_ROOT / "models")


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `env_prefix` and their default port."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True, populate_by_name=True)

    host: str = Field(
        "127.0.0.1", description="loopback unless opted in: 0.0.0.0 serves the LAN (the container images set it)"
    )
    port: int = 8000
    ssl_certfile: Path | None = Field(
        None,
        description="serve HTTPS with this certificate (PEM) and ssl_keyfile: browsers allow the microphone "
        "only on https pages or localhost (`make run HTTPS=1` makes a self-signed pair for the LAN)",
    )
    ssl_keyfile: Path | None = None
    api_key: str | None = None
    log_level: str = "INFO"
    log_json: bool = True
    max_body_mb: float = 25.0
    max_streams: int = Field(64, ge=1, description="open WebSocket streams; one more gets a fatal `error` event")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="web pages (scheme://host[:port]) besides this server's own that may open its WebSockets; "
        "clients that send no Origin (services, SDKs) are not affected",
    )
    models_dir: Path = default_models_dir()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
