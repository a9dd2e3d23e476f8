"""App factory: every service gets /healthz, /info, /metrics, the error format, request ids,
body size limits and optional API-key auth from here, and loads its engine in the background so
/healthz can say 503 "loading" until the model is ready."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .errors import ApiError, error_body, install_error_handlers
from .logs import request_id
from .settings import ServiceSettings
from .streams import StreamGate, StreamHandler

logger = logging.getLogger(__name__)
T = TypeVar("T")
OPEN_PATHS = {"/healthz", "/livez", "/readyz"}  # probes need no key


class EngineSlot(Generic[T]):
    """Holds a service's engine and why it is not usable yet (loading, failed)."""

    def __init__(self, engine: T | None = None) -> None:
        self.engine = engine
        self.reason = "ready" if engine is not None else "loading model"

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def get(self) -> T:
        if self.engine is None:
            raise ApiError(503, "not_ready", f"service not ready: {self.reason}", {"Retry-After": "2"})
        return self.engine


def _json_response(status: int, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status)


class GateMiddleware:
    """Pure ASGI: request id, API key (HTTP and WebSocket), body size limit, request metrics."""

    def __init__(self, app: ASGIApp, settings: ServiceSettings, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.settings = settings
        self.requests = requests
        self.latency = latency

    def _authorized(self, scope: Scope) -> bool:
        return scope["path"] in OPEN_PATHS or has_key(self.settings, scope)

    def _origin_allowed(self, scope: Scope) -> bool:
        """A browser tells where the page that opens a WebSocket came from; only this server's own pages
        (and `allowed_origins`) may talk to it, so a page on another site cannot reach a conversation
        through the user's browser. Non-browser clients send no Origin."""
        headers = _text_headers(scope)
        origin = headers.get("origin")
        if origin is None:
            return True
        if origin in self.settings.allowed_origins:
            return True
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        supplied_id = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = "".join(c for c in supplied_id if "!" <= c <= "~")[:64] or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        try:
            if not self._authorized(scope):
                if scope["type"] == "websocket":  # accepted, then closed: the client sees 1008, not a bare 403
                    if (await receive())["type"] == "websocket.connect":
                        await send({"type": "websocket.accept"})
                        await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
                    return
                body = error_body(401, "invalid_api_key", "invalid or missing API key")
                await _json_response(401, body)(scope, receive, send)
                return
            if scope["type"] == "websocket":
                if not self._origin_allowed(scope):
                    logger.warning("WebSocket from a foreign page refused (Origin not allowed)")
                    await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
                    return
                await self.app(scope, receive, send)
                return
            await self._http(scope, receive, send, rid, headers)
        finally:
            request_id.reset(token)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str, headers: dict[bytes, bytes]) -> None:
        limit = self.settings.max_body_bytes
        over = _BodyTooLarge(self.settings.max_body_mb)
        too_big = error_body(413, over.code, over.detail)
        length = headers.get(b"content-length")
        if length and length.isdigit() and int(length) > limit:
            await _json_response(413, too_big)(scope, receive, send)
            return
        received = 0
        started = False
        status = 500

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise over
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not started:
                status = 413
                await _json_response(413, too_big)(scope, receive, send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - t0)


def has_key(settings: ServiceSettings, scope: Scope) -> bool:
    """Whether a request carries the service's API key (always true when none is set)."""
    key = settings.api_key
    if not key:
        return True
    headers = _text_headers(scope)
    supplied = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    if supplied is None and scope["type"] == "websocket":  # browsers cannot set WS headers
        supplied = (parse_qs(scope.get("query_string", b"").decode()).get("api_key") or [None])[0]
        for offered in headers.get("sec-websocket-protocol", "").split(","):  # as OpenAI's Realtime in browsers
            if offered.strip().startswith("openai-insecure-api-key."):
                supplied = offered.strip().removeprefix("openai-insecure-api-key.")
    # bytes: compare_digest refuses str with non-ASCII characters (a 500 on a strange key)
    return supplied is not None and hmac.compare_digest(supplied.encode(), key.encode())


def _text_headers(scope: Scope) -> dict[str, str]:
    """Header names and values as text; latin-1, as HTTP defines them, so no byte sequence fails."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class _BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without Content-Length outgrows the limit. An HTTPException,
    so FastAPI's body parsing passes it on (it turns other errors into a 400) and it is answered 413."""

    code = "payload_too_large"

    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, f"request body over {limit_mb:g} MB")


def create_service_app(
    *,
    name: str,
    settings: ServiceSettings,
    load: Callable[[], T] | None,
    engine: T | None = None,
    info: Callable[[T | None], dict[str, Any]] = lambda _: {},
    health: Callable[[FastAPI], Awaitable[dict[str, Any]]] | None = None,
    stream: Callable[[WebSocket, T], StreamHandler[Any]] | None = None,
    more_streams: dict[str, Callable[[WebSocket, T], StreamHandler[Any]]] | None = None,
    version: str = __version__,
) -> FastAPI:
    """Build a service app. `load` runs in a worker thread after start-up unless `engine` is given.
    `stream` makes one handler per connection on `WS /ws`, `more_streams` on other paths, all admitted by
    one `StreamGate` (one limit for all of them)."""
    slot: EngineSlot[T] = EngineSlot(engine)
    registry = CollectorRegistry()

    async def load_in_background() -> None:
        assert load is not None
        t0 = time.perf_counter()
        try:
            slot.engine = await asyncio.to_thread(load)
            slot.reason = "ready"
            logger.info("%s engine loaded in %.1f s", name, time.perf_counter() - t0)
        except Exception as exc:
            slot.reason = f"model failed to load: {type(exc).__name__}: {exc}"
            logger.exception("%s engine failed to load", name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if slot.engine is None and load is not None:
            task = asyncio.create_task(load_in_background())
        elif slot.engine is None:
            slot.reason = "ready"
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            close = getattr(slot.engine, "close", None)
            if callable(close):
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    app = FastAPI(title=f"voicechat {name}", version=version, lifespan=lifespan)
    app.state.slot = slot
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    requests = Counter("http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("http_request_duration_seconds", "HTTP request latency", ["route"], registry=registry)
    app.add_middleware(GateMiddleware, settings=settings, requests=requests, latency=latency)

    def ready() -> bool:
        return slot.ready or load is None

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        """Open to probes; the details (reasons, downstream URLs, pids) only with the key, when one is set."""
        ok = ready()
        body: dict[str, Any] = {"service": name, "status": "ok" if ok else "unavailable"}
        if has_key(settings, request.scope):
            if not ok:
                body["reason"] = slot.reason
            if health is not None:
                body.update(await health(app))
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/livez", tags=["ops"])
    async def livez() -> dict[str, str]:
        """The process answers: a liveness probe restarts it otherwise. Never 503 while a model loads."""
        return {"service": name, "status": "alive"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Ready to serve (model loaded): a readiness probe sends traffic only then."""
        ok = ready()
        return JSONResponse({"service": name, "status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/info", tags=["ops"])
    async def get_info() -> dict[str, Any]:
        return {"service": name, "version": version, "ready": slot.ready, **info(slot.engine)}

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = {"/ws": stream} if stream is not None else {}
    routes |= more_streams or {}
    if routes:
        gate = StreamGate(name, lambda: slot.engine, lambda: slot.reason, settings.max_streams, registry)

        def route(handler: Callable[[WebSocket, T], StreamHandler[Any]]) -> Callable[[WebSocket], Awaitable[None]]:
            async def ws(socket: WebSocket) -> None:
                await gate.serve(socket, handler)

            return ws

        for path, handler in routes.items():
            app.add_api_websocket_route(path, route(handler))

    return app


def engine_of(request: Request) -> Any:
    """FastAPI dependency body: the loaded engine, or a 503 while it loads."""
    return request.app.state.slot.get()


def run(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve with uvicorn; shared by every service's __main__."""
    import uvicorn

    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=4 * 1024 * 1024,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
