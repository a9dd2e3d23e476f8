"""main-app: the browser WebSocket, text chat over HTTP, conversations, the web UI."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field
from voice_common.app import create_service_app
from voice_common.errors import ApiError
from voice_common.protocol import ChatMessage, TurnMetrics
from voice_common.sse import event_stream

from .owner import give_owner_cookie, owner_of
from .realtime import RealtimeSession
from .reply import LLM_DOWN_REPLY, Generations, llm_request
from .services import ServiceError, Services, WsServices, check_health
from .session import Session
from .settings import AppSettings
from .store import Store, open_store

logger = logging.getLogger(__name__)
STAGES = ("stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_sent_ms", "reply_done_ms")


@dataclass
class AppContext:
    """Shared, stateless-per-session things: settings, the store, the services, metrics, the HTTP
    client for health and voices. No session state here. Closed by the app factory's lifespan."""

    settings: AppSettings
    store: Store
    services: Services
    stage_seconds: Histogram | None = None
    speculations: Counter | None = None
    prefills: Counter | None = None
    http: httpx.AsyncClient = field(default_factory=httpx.AsyncClient)
    generations: Generations = field(default_factory=Generations)

    def speculated(self, result: str, wasted_tokens: int) -> None:
        """hit: the held reply went out; miss / dropped: it was thrown away with its tokens."""
        if self.speculations is not None:
            self.speculations.labels(result).inc()
            if wasted_tokens:
                self.speculations.labels("wasted_tokens").inc(wasted_tokens)

    def prefilled(self) -> None:
        if self.prefills is not None:
            self.prefills.inc()

    async def conversation(self, cid: str | None, owner: str) -> str:
        """The owner's conversation to continue (404 when unknown or someone else's), or a new one."""
        if cid:
            if not await self.store.exists(cid, owner):
                raise ApiError(404, "conversation_not_found", f"no conversation {cid!r}")
            return cid
        return await self.store.create(owner)

    def observe(self, metrics: TurnMetrics) -> None:
        stages = {k.removesuffix("_ms"): getattr(metrics, k) for k in STAGES if getattr(metrics, k) is not None}
        verdict = "" if metrics.turn_probability is None else f", turn model p={metrics.turn_probability:.2f}"
        logger.info("turn %s (%s%s%s) ms after the turn: %s", metrics.turn, metrics.source,
                    ", speculative" if metrics.speculative else "", verdict, stages)  # fmt: skip
        if self.stage_seconds is None:
            return
        for stage in STAGES:
            value = getattr(metrics, stage)
            if value is not None:
                self.stage_seconds.labels(stage.removesuffix("_ms"), metrics.source).observe(value / 1000)

    async def close(self) -> None:
        await self.store.close()
        await self.http.aclose()


Owner = Annotated[str, Depends(owner_of)]


class ChatRequest(BaseModel):
    message: str = Field(min_length=1, max_length=4000)
    conversation_id: str | None = None
    stream: bool = False


def create_app(settings: AppSettings | None = None, engine: AppContext | None = None) -> FastAPI:
    settings = settings or AppSettings()

    async def downstream_health(app: FastAPI) -> dict[str, Any]:
        context: AppContext | None = app.state.slot.engine
        return {"downstream": await check_health(settings, context.http)} if context is not None else {}

    app = create_service_app(
        name="main-app",
        settings=settings,
        load=lambda: AppContext(
            settings, open_store(settings), WsServices(settings), stage_seconds, speculations, prefills
        ),
        engine=engine,
        info=lambda _: {
            "model": None,
            "audio_format": {"input": "any rate, PCM16 mono preferred (16 kHz)", "output": settings.output_sample_rate},
            "device": "cpu",
            "services": {s: getattr(settings, f"{s}_url") for s in ("vad", "stt", "tts", "llm")},
        },
        health=downstream_health,
        stream=Session,
        more_streams={"/v1/realtime": RealtimeSession},  # OpenAI's Realtime API, the same pipeline
    )
    stage_seconds = Histogram(
        "voice_turn_stage_seconds",
        "time from end of user speech to each stage",
        ["stage", "source"],
        registry=app.state.registry,
        buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
    )
    speculations = Counter(
        "voice_speculations",
        "replies started on the eager transcript, by outcome (and the tokens of those thrown away)",
        ["result"],
        registry=app.state.registry,
    )
    prefills = Counter(
        "voice_prefills", "the user's words read into the LLM's cache while they spoke", registry=app.state.registry
    )

    def ctx() -> AppContext:
        context: AppContext = app.state.slot.get()
        return context

    @app.get("/voices")
    async def voices() -> Any:
        """The TTS service's voices, for the page's voice picker."""
        try:
            r = await ctx().http.get(settings.tts_url + "/voices", timeout=5)
        except httpx.HTTPError as exc:
            raise ApiError(503, "tts_unavailable", f"cannot reach the TTS service: {exc}") from None
        if r.status_code != 200:
            raise ApiError(503, "tts_unavailable", "the TTS service is not ready")
        return r.json()

    @app.get("/conversations")
    async def list_conversations(owner: Owner) -> dict[str, Any]:
        return {"conversations": await ctx().store.list(owner)}

    @app.get("/conversations/{cid}")
    async def get_conversation(cid: str, owner: Owner) -> dict[str, Any]:
        meta = await ctx().store.get(cid, owner)
        if meta is None:
            raise ApiError(404, "conversation_not_found", f"no conversation {cid!r}")
        return {**meta, "messages": await ctx().store.messages(cid)}

    @app.delete("/conversations/{cid}")
    async def delete_conversation(cid: str, owner: Owner) -> dict[str, Any]:
        if not await ctx().store.delete(cid, owner):
            raise ApiError(404, "conversation_not_found", f"no conversation {cid!r}")
        return {"deleted": cid}

    @app.post("/chat")
    async def chat(req: ChatRequest, owner: Owner) -> Any:
        """Text chat for clients without a WebSocket: JSON, or SSE like the LLM service."""
        store = ctx().store
        cid = await ctx().conversation(req.conversation_id, owner)
        await store.add(cid, "user", req.message, "text")
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in await store.messages(cid)]
        t0 = time.monotonic()

        async def tokens() -> AsyncIterator[tuple[str, ServiceError | None]]:
            try:
                async for token in ctx().services.llm(llm_request(settings, history, cid, speculative=False)):
                    yield token, None
            except ServiceError as exc:
                yield "", exc

        if not req.stream:
            parts: list[str] = []
            failure: ServiceError | None = None
            async for token, err in tokens():
                parts.append(token)
                failure = failure or err
            reply = "".join(parts).strip()
            if failure and not reply:  # the LLM's own reason: down, busy, or a refusal of this request
                if failure.code in ("service_unavailable", "timeout"):
                    raise ApiError(503, "llm_unavailable", f"{LLM_DOWN_REPLY} ({failure.message})")
                raise ApiError(502, failure.code, f"the language model failed: {failure.message}")
            await store.add(cid, "assistant", reply, "text")
            return {
                "conversation_id": cid,
                "reply": reply,
                "timings": {"total_ms": round((time.monotonic() - t0) * 1000)},
            }

        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"type": "conversation", "conversation_id": cid}
            parts: list[str] = []
            async for token, err in tokens():
                if err:
                    yield {"type": "error", "service": "llm", "code": err.code, "message": err.message}
                    break
                parts.append(token)
                yield {"type": "token", "text": token}
            reply = "".join(parts).strip()
            if reply:
                await store.add(cid, "assistant", reply, "text")
            yield {"type": "done", "conversation_id": cid, "reply": reply}

        return event_stream(events())

    if settings.web_dir.exists():
        app.mount("/static", StaticFiles(directory=settings.web_dir), name="static")

        @app.get("/", include_in_schema=False)
        async def index(request: Request) -> FileResponse:
            page = FileResponse(settings.web_dir / "index.html")
            give_owner_cookie(request, page)
            return page

    return app
