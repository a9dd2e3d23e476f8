from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from voice_common.settings import ServiceSettings

VOICE_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your replies are spoken aloud, so answer in one to three short, "
    "natural sentences. Never use markdown, lists, code, emoji or symbols. Say numbers the way people speak them."
)


class LlmSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_")

    port: int = 3004
    max_body_mb: float = Field(2.0, description="a chat request is text: 2 MB is hundreds of pages")
    backend: Literal["llama-server", "embedded", "ollama", "openai"] = Field(
        "llama-server",
        description="llama-server: llama.cpp's server as a child process, several conversations batched (built "
        "by `make llama-server`); embedded: llama.cpp in-process, one generation at a time; ollama / openai: a "
        "remote server",
    )
    system_prompt: str = VOICE_SYSTEM_PROMPT
    context_tokens: int = Field(2048, description="history is trimmed to this minus max_tokens")
    default_max_tokens: int = 256
    max_concurrent: int | None = Field(
        None,
        description="generations at once (more wait, the most urgent first); default: parallel for "
        "llama-server, 1 for embedded, 8 for a remote server",
    )
    max_queue: int = 8
    first_token_timeout_s: float = 30.0
    # llama-server and embedded (llama.cpp on this machine)
    model_path: Path | None = Field(None, description="GGUF file; default the bundled Qwen2.5 0.5B")
    threads: int = Field(
        2,
        description="threads that generate token by token (1 leaves a core to piper and the STT meanwhile: "
        "generation ~10 % slower, no net change measured on 2 cores)",
    )
    threads_batch: int = Field(2, description="threads that read a prompt (compute-bound: every core helps)")
    parallel: int = Field(4, description="llama-server slots: conversations generated at once, batched")
    server_binary: Path | None = Field(None, description="llama-server executable; default the one `make` builds")
    server_port: int = Field(0, description="llama-server's port on 127.0.0.1; 0 = any free port")
    cache_ram_mb: int = Field(
        64, description="llama-server's RAM for the prompts of conversations beyond the slots (0: none)"
    )
    # ollama
    ollama_base_url: str = Field("http://localhost:11434", validation_alias="OLLAMA_BASE_URL")
    ollama_model: str = "qwen3:14b"
    ollama_keep_alive: str = "30m"
    ollama_num_ctx: int = 4096
    ollama_think: bool = Field(
        False,
        description="let a reasoning model (qwen3, deepseek-r1...) think before it answers: seconds before the "
        "first word, so off for voice; when on, the thoughts are streamed as `thinking` events and never spoken",
    )
    ollama_pull: bool = Field(False, description="pull the model at start when the Ollama host lacks it")
    connect_timeout_s: float = 5.0
    # openai-compatible
    openai_base_url: str = "http://localhost:8080/v1"
    openai_api_key: str = "unused"
    openai_model: str = "default"

    @property
    def concurrency(self) -> int:
        if self.max_concurrent is not None:
            return self.max_concurrent
        return {"llama-server": self.parallel, "embedded": 1}.get(self.backend, 8)

    @property
    def resolved_model_path(self) -> Path:
        return self.model_path or self.models_dir / "llm" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
