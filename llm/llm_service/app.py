"""LLM HTTP (JSON + SSE), OpenAI-compatible and WebSocket API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, WebSocket
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field
from voice_common.app import create_service_app, engine_of
from voice_common.errors import ApiError, error_body
from voice_common.limits import Limiter
from voice_common.protocol import (
    Cancel,
    Cancelled,
    ChatMessage,
    GenerateRequest,
    LlmClientEvent,
    LlmDone,
    Thinking,
    Token,
    llm_client_events,
)
from voice_common.sse import event_stream
from voice_common.streams import StreamHandler

from .backends import Backend, EmbeddedBackend, LlamaServerBackend, OllamaBackend, OpenAIBackend
from .generation import Output, generate
from .llama_server import LlamaServer, default_binary
from .settings import LlmSettings

logger = logging.getLogger(__name__)
SERVICE = "llm"
Engine = Annotated[Backend, Depends(engine_of)]


def build_backend(settings: LlmSettings) -> Backend:
    if settings.backend == "ollama":
        ollama = OllamaBackend(
            settings.ollama_base_url,
            settings.ollama_model,
            settings.ollama_keep_alive,
            settings.ollama_num_ctx,
            settings.connect_timeout_s,
            think=settings.ollama_think,
        )
        ollama.warm_up(settings.system_prompt, pull=settings.ollama_pull)
        return ollama
    if settings.backend == "openai":
        return OpenAIBackend(
            settings.openai_base_url, settings.openai_api_key, settings.openai_model, settings.connect_timeout_s
        )
    if settings.backend == "llama-server":
        path = settings.resolved_model_path
        server = LlamaServer(
            settings.server_binary or default_binary(),
            path,
            alias=path.stem,
            parallel=settings.parallel,
            ctx_per_slot=settings.context_tokens,
            threads=settings.threads,
            threads_batch=settings.threads_batch,
            port=settings.server_port,
            cache_ram_mb=settings.cache_ram_mb,
        )
        return LlamaServerBackend(server, path.stem, settings.system_prompt)
    return EmbeddedBackend(
        settings.resolved_model_path,
        settings.threads,
        settings.context_tokens,
        settings.system_prompt,
        threads_batch=settings.threads_batch,
    )


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = Field(None, max_length=200)

    def to_generate(self, default_max: int) -> GenerateRequest:
        messages = []
        for i, m in enumerate(self.messages):
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            role = m.get("role")
            if role not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, "invalid_role", f"messages[{i}].role {role!r} is not system, user or assistant")
            messages.append(ChatMessage(role="system" if role == "developer" else role, content=str(content or "")))
        return GenerateRequest(
            messages=messages,
            temperature=self.temperature,
            model=self.model,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            prompt_cache_key=self.prompt_cache_key,
        )


async def collect(events: AsyncIterator[Output]) -> tuple[str, str, LlmDone]:
    """A whole reply (and the thoughts before it, if any), for the non-streaming APIs."""
    parts: list[str] = []
    thoughts: list[str] = []
    async for event in events:
        if isinstance(event, Token):
            parts.append(event.text)
        elif isinstance(event, Thinking):
            thoughts.append(event.text)
        else:
            return "".join(parts), "".join(thoughts), event
    raise ApiError(500, "incomplete_generation", "the generation ended without a done event")


def create_app(settings: LlmSettings | None = None, engine: Backend | None = None) -> FastAPI:
    settings = settings or LlmSettings()

    async def backend_health(app: FastAPI) -> dict[str, Any]:
        backend = app.state.slot.engine
        if backend is None or settings.backend == "embedded":
            return {"backend": settings.backend}
        if isinstance(backend, LlamaServerBackend):
            return {"backend": settings.backend, **backend.health()}
        try:
            models = await asyncio.wait_for(backend.models(), 3)
            return {
                "backend": settings.backend,
                "backend_reachable": True,
                "model_available": any(m in (backend.model, f"{backend.model}:latest") for m in models),
            }
        except (ApiError, TimeoutError) as exc:
            return {"backend": settings.backend, "backend_reachable": False, "backend_error": str(exc)}

    app = create_service_app(
        name=SERVICE,
        settings=settings,
        load=lambda: build_backend(settings),
        engine=engine,
        info=lambda e: {
            "backend": settings.backend,
            "model": getattr(e, "model", None),
            "device": "cpu" if settings.backend in ("embedded", "llama-server") else "remote",
            "base_url": getattr(e, "base_url", None),
            "max_concurrent": settings.concurrency,
        },
        health=backend_health,
        stream=lambda socket, backend: LlmStream(socket, lambda req: run(backend, req)),
    )
    limiter = Limiter(settings.concurrency, settings.max_queue)
    reg = app.state.registry
    first_token = Histogram("llm_first_token_seconds", "time to first token", registry=reg)
    tokens_out = Counter("llm_streamed_tokens", "tokens sent to clients", registry=reg)
    backend_tokens = Gauge(
        "llm_backend_tokens", "tokens produced by the embedded model (stops after cancel)", registry=reg
    )
    backend_tokens.set_function(lambda: float(getattr(app.state.slot.engine, "tokens_generated", 0)))

    async def run(backend: Backend, req: GenerateRequest) -> AsyncIterator[Output]:
        async for event in generate(backend, limiter, req, settings):
            if isinstance(event, Token):
                tokens_out.inc()
            elif isinstance(event, LlmDone) and event.timings.first_token_ms is not None:
                first_token.observe(event.timings.first_token_ms / 1000)
            yield event

    async def started(gen: AsyncIterator[Output]) -> tuple[Output, AsyncIterator[Output]]:
        """Wait for the first event so backend errors still become a proper HTTP status."""
        return await anext(gen), gen

    @app.post("/generate")
    async def generate_endpoint(req: GenerateRequest, backend: Engine) -> Any:
        if not req.stream:
            text, thinking, done = await collect(run(backend, req))
            return {
                "response": text,
                **({"thinking": thinking} if thinking else {}),
                "model": done.model,
                "usage": done.usage.model_dump(),
                "timings": done.timings.model_dump(),
                "finish_reason": done.finish_reason,
            }
        first, gen = await started(run(backend, req))

        async def body() -> AsyncIterator[str | dict[str, Any]]:
            try:
                event: Output | None = first
                while event is not None:
                    yield event.dump()
                    event = await anext(gen, None)
            except ApiError as exc:
                yield {"type": "error", **error_body(exc.status, exc.code, exc.message)}
            finally:
                await gen.aclose()  # type: ignore[attr-defined]

        return event_stream(body())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: OpenAIChatRequest, backend: Engine) -> Any:
        req = body.to_generate(settings.default_max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = req.model or backend.model
        if not body.stream:
            text, thinking, done = await collect(run(backend, req))
            u = done.usage
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            **({"reasoning_content": thinking} if thinking else {}),
                        },
                        "finish_reason": done.finish_reason if done.finish_reason != "cancelled" else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                },
            }
        first, gen = await started(run(backend, req))
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
            """One chunk as OpenAI sends them: with `include_usage`, every chunk has `usage: null` and
            one last chunk has no choices and the usage."""
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
                **({"usage": usage} if include_usage else {}),
            }

        async def stream() -> AsyncIterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                event: Output | None = first
                while event is not None:
                    if isinstance(event, Token):
                        yield chunk({"content": event.text})
                    elif isinstance(event, Thinking):  # as vLLM and DeepSeek stream a model's reasoning
                        yield chunk({"reasoning_content": event.text})
                    else:
                        yield chunk({}, "length" if event.finish_reason == "length" else "stop")
                        if include_usage:
                            u = event.usage
                            total = u.prompt_tokens + u.completion_tokens
                            usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}
                            yield chunk(None, usage={**usage, "total_tokens": total})
                    event = await anext(gen, None)
            except ApiError as exc:
                yield error_body(exc.status, exc.code, exc.message)
            finally:
                await gen.aclose()  # type: ignore[attr-defined]

        return event_stream(stream())

    @app.get("/v1/models")
    async def models(backend: Engine) -> dict[str, Any]:
        names = await backend.models()
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": backend.name} for n in names],
        }

    return app


class LlmStream(StreamHandler[LlmClientEvent]):
    """One generation at a time per connection; `cancel` (or the disconnect) stops it between tokens."""

    service = SERVICE
    events = llm_client_events

    def __init__(self, socket: WebSocket, generate: Callable[[GenerateRequest], AsyncIterator[Output]]):
        super().__init__(socket)
        self.generate = generate
        self.current: asyncio.Task[None] | None = None

    async def on_event(self, event: LlmClientEvent) -> None:
        if isinstance(event, Cancel):
            if self.current is not None and not self.current.done():
                self.current.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.current
            await self.send(Cancelled())
        elif self.current is not None and not self.current.done():
            await self.error("busy", "a generation is already running on this socket; cancel it first")
        else:
            self.current = self.spawn(self.produce(event))

    async def produce(self, req: GenerateRequest) -> None:
        try:
            async for event in self.generate(req):
                await self.send(event)
        except ApiError as exc:
            await self.error(exc.code, exc.message)
