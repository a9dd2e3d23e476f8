"""One generation, whatever the API: validation, system prompt, history budget, limits, timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from voice_common.chat import trim_history
from voice_common.errors import ApiError
from voice_common.limits import Limiter
from voice_common.protocol import ChatMessage, GenerateRequest, LlmDone, Thinking, Timings, Token, Usage

from .backends import Backend, BackendError
from .settings import LlmSettings

Output = Token | Thinking | LlmDone


def validate(messages: list[ChatMessage]) -> None:
    if not messages:
        raise ApiError(400, "empty_messages", "messages must not be empty")
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise ApiError(400, "empty_content", f"messages[{i}].content is empty")
    if messages[-1].role != "user":
        raise ApiError(400, "last_message_not_user", "the last message must come from the user")


def check_model(model: str | None, backend: Backend) -> None:
    """Ollama and OpenAI-compatible hosts choose among their models; a local engine has one, and a
    request for another one is answered as OpenAI does (404), not served with the wrong model."""
    if model and backend.serves_one_model and model not in (backend.model, "default"):
        raise ApiError(
            404,
            "model_not_found",
            f"model {model!r} is not served here; this service serves {backend.model!r} (or leave model out)",
        )


def prepare(req: GenerateRequest, settings: LlmSettings) -> list[dict[str, str]]:
    validate(req.messages)
    messages = list(req.messages)
    if not any(m.role == "system" for m in messages):
        messages.insert(0, ChatMessage(role="system", content=req.system_prompt or settings.system_prompt))
    budget = max(256, settings.context_tokens - req.max_tokens)
    return [m.model_dump() for m in trim_history(messages, budget)]


async def generate(
    backend: Backend, limiter: Limiter, req: GenerateRequest, settings: LlmSettings
) -> AsyncIterator[Output]:
    """Token (and Thinking) events, then one done event. Closing the iterator stops the backend."""
    check_model(req.model, backend)
    messages = prepare(req, settings)
    async with limiter.slot(req.priority):
        t0 = time.perf_counter()
        first: float | None = None  # the first token of the answer
        heard = False  # anything from the backend yet (a reasoning model thinks first)
        usage = Usage()
        finish = "stop"
        stream = backend.stream(messages, req.temperature, req.max_tokens, req.model, req.prompt_cache_key)
        try:
            while True:
                timeout = settings.first_token_timeout_s if not heard else None
                try:
                    chunk = await asyncio.wait_for(anext(stream), timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise BackendError(
                        "first_token_timeout", f"no token from the {backend.name} backend in {timeout:.0f} s", 504
                    ) from None
                heard = True
                if chunk.thinking:
                    yield Thinking(text=chunk.thinking)
                if chunk.text:
                    if first is None:
                        first = time.perf_counter()
                    yield Token(text=chunk.text)
                if chunk.completion_tokens is not None:
                    usage = Usage(prompt_tokens=chunk.prompt_tokens or 0, completion_tokens=chunk.completion_tokens)
                    finish = chunk.finish_reason or finish
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        total = time.perf_counter() - t0
        timings = Timings(
            first_token_ms=round((first - t0) * 1000, 1) if first else None, total_ms=round(total * 1000, 1)
        )
        yield LlmDone(model=req.model or backend.model, usage=usage, timings=timings, finish_reason=finish)
