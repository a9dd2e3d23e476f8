"""LLM backends behind one small interface: stream chunks for a chat, stop when the consumer stops.

Closing the async iterator (the client cancelled or went away) stops generation at the backend:
embedded -> a flag checked between tokens; llama-server / ollama / openai -> the HTTP stream is closed
(llama-server frees the slot at once).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from voice_common.errors import ApiError

if TYPE_CHECKING:
    from .llama_server import LlamaServer

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    text: str = ""
    thinking: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class Backend(Protocol):
    name: str
    model: str
    serves_one_model: bool  # a local engine: a request for any other model is a mistake, not a choice

    def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        model: str | None,
        cache_key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """`cache_key` (a conversation): a hint that lets a backend with several caches reuse the right one."""
        ...

    async def models(self) -> list[str]: ...


class BackendError(ApiError):
    """A backend failure with a code main-app can act on (unreachable, model_not_found, timeout...)."""

    def __init__(self, code: str, message: str, status: int = 502) -> None:
        super().__init__(status, code, message)


class EmbeddedBackend:
    """llama.cpp in-process. One generation at a time per model; tokens cross from the worker thread
    through a queue (at most `max_tokens` items, so it needs no bound of its own); a threading.Event
    stops the generator between tokens."""

    name = "embedded"
    serves_one_model = True

    def __init__(
        self,
        path: Path,
        threads: int,
        n_ctx: int,
        warmup_system_prompt: str | None = None,
        threads_batch: int | None = None,
    ) -> None:
        from llama_cpp import Llama

        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `make models`")
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads_batch or threads,
            verbose=False,
        )
        self.model = path.stem
        self._lock = threading.Lock()
        self.tokens_generated = 0  # every token llama.cpp produced, exported on /metrics
        if warmup_system_prompt:
            # llama.cpp reuses the longest common prompt prefix across calls: evaluating the system
            # prompt now takes ~300 ms off the first reply's first token.
            messages: Any = [{"role": "system", "content": warmup_system_prompt}, {"role": "user", "content": "Hi"}]
            self.llm.create_chat_completion(messages=messages, max_tokens=1)

    async def models(self) -> list[str]:
        return [self.model]

    def _run(
        self, messages: list[dict[str, str]], temperature: float, max_tokens: int, cancel: threading.Event, put: Any
    ) -> None:
        with self._lock:
            try:
                complete: Any = self.llm.create_chat_completion
                stream = complete(
                    messages=messages,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    stream=True,
                )
                completion = 0
                finish = None
                for part in stream:
                    self.tokens_generated += 1
                    if cancel.is_set():
                        break
                    choice = part["choices"][0]
                    delta = choice.get("delta", {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    if delta:
                        completion += 1
                        put(Chunk(text=str(delta)))
                prompt = len(self.llm.tokenize(_flatten(messages).encode(), special=True))
                put(
                    Chunk(
                        prompt_tokens=prompt,
                        completion_tokens=completion,
                        finish_reason="cancelled" if cancel.is_set() else finish or "stop",
                    )
                )
            except Exception as exc:
                put(exc)
            finally:
                put(None)

    async def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        model: str | None,
        cache_key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | Exception | None] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Chunk | Exception | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        worker = loop.run_in_executor(None, self._run, messages, temperature, max_tokens, cancel, put)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise BackendError("generation_failed", f"{type(item).__name__}: {item}", 500)
                yield item
        finally:
            cancel.set()
            await asyncio.shield(worker)


def _flatten(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class OllamaBackend:
    """The official ollama client against OLLAMA_BASE_URL (a GPU host)."""

    name = "ollama"
    serves_one_model = False

    def __init__(
        self,
        base_url: str,
        model: str,
        keep_alive: str,
        num_ctx: int,
        connect_timeout: float,
        think: bool = False,
    ) -> None:
        import httpx
        import ollama

        self.base_url = base_url
        self.model = model
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx
        self.think = think
        self.timeout = httpx.Timeout(300.0, connect=connect_timeout)
        self.client = ollama.AsyncClient(host=base_url, timeout=self.timeout)

    def warm_up(self, system_prompt: str, pull: bool) -> None:
        """At start (in the loading thread): load the model on the Ollama host and evaluate the system
        prompt, so the first user does not wait for either; pull the model first when asked to. A host
        that is down or lacks the model is logged, not fatal: the service reports it in /healthz and
        serves as soon as the host can."""
        import ollama

        client = ollama.Client(host=self.base_url, timeout=self.timeout)
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hi"}]
        options = {"num_predict": 1, "num_ctx": self.num_ctx}
        for attempt in (1, 2):
            try:
                client.chat(self.model, messages=messages, options=options, keep_alive=self.keep_alive, think=False)
                logger.info("ollama: %s loaded on %s and the system prompt evaluated", self.model, self.base_url)
                return
            except Exception as exc:
                error = self._error(exc)
            if error.code == "model_not_found" and pull and attempt == 1:
                self.pull(client)
                continue
            if error.code == "model_not_found":
                logger.error("%s (or set LLM_OLLAMA_PULL=1 to pull it at start)", error.message)
            else:
                logger.warning("ollama warm-up skipped: %s", error.message)
            return

    def pull(self, client: Any) -> None:
        logger.info("ollama: pulling %s on %s ...", self.model, self.base_url)
        shown: tuple[str | None, int] = (None, -1)
        for progress in client.pull(self.model, stream=True):
            percent = int(100 * progress.completed / progress.total) // 10 * 10 if progress.total else -1
            if (progress.status, percent) != shown:
                shown = (progress.status, percent)
                logger.info("ollama pull %s: %s%s", self.model, progress.status, f" {percent}%" if percent >= 0 else "")

    async def models(self) -> list[str]:
        try:
            listing = await self.client.list()
        except Exception as exc:
            raise self._error(exc) from None
        return [m.model or "" for m in listing.models]

    def _error(self, exc: Exception) -> BackendError:
        import ollama

        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404 or "not found" in str(exc.error).lower():
                return BackendError(
                    "model_not_found",
                    f"model {self.model!r} is not pulled on {self.base_url}: run `ollama pull {self.model}`",
                    404,
                )
            return BackendError("backend_error", f"ollama: {exc.error}")
        if isinstance(exc, ConnectionError | OSError) or type(exc).__name__ in ("ConnectError", "ConnectTimeout"):
            return BackendError("backend_unreachable", f"cannot reach Ollama at {self.base_url}: {exc}", 503)
        return BackendError("backend_error", f"ollama: {type(exc).__name__}: {exc}")

    async def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        model: str | None,
        cache_key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        try:
            response = await self.client.chat(
                model=model or self.model,
                messages=messages,
                stream=True,
                keep_alive=self.keep_alive,
                # unset, Ollama lets a reasoning model think first: the reply budget goes to hidden thoughts
                think=self.think,
                options={"temperature": temperature, "num_predict": max_tokens, "num_ctx": self.num_ctx},
            )
            async for part in response:
                if part.message and part.message.thinking:
                    yield Chunk(thinking=part.message.thinking)
                if part.message and part.message.content:
                    yield Chunk(text=part.message.content)
                if part.done:
                    yield Chunk(
                        prompt_tokens=part.prompt_eval_count or 0,
                        completion_tokens=part.eval_count or 0,
                        finish_reason=part.done_reason or "stop",
                    )
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(exc) from None


class OpenAIBackend:
    """Any OpenAI-compatible server: vLLM, llama.cpp's server, OpenAI itself."""

    name = "openai"
    serves_one_model = False

    def __init__(
        self, base_url: str, api_key: str, model: str, connect_timeout: float, keepalive_s: float | None = None
    ) -> None:
        import openai
        from openai._constants import DEFAULT_CONNECTION_LIMITS

        self.base_url = base_url
        self.model = model
        http = None
        if keepalive_s is not None:  # the client's own httpx (its Limits type, not the httpx we import)
            limits = type(DEFAULT_CONNECTION_LIMITS)(
                max_connections=DEFAULT_CONNECTION_LIMITS.max_connections,
                max_keepalive_connections=DEFAULT_CONNECTION_LIMITS.max_keepalive_connections,
                keepalive_expiry=keepalive_s,
            )
            http = openai.DefaultAsyncHttpxClient(limits=limits)
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=300.0, http_client=http
        )

    async def models(self) -> list[str]:
        try:
            return [m.id async for m in self.client.models.list()]
        except Exception as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> BackendError:
        import openai

        if isinstance(exc, openai.APIConnectionError):
            return BackendError("backend_unreachable", f"cannot reach {self.base_url}: {exc}", 503)
        if isinstance(exc, openai.NotFoundError):
            return BackendError("model_not_found", f"model {self.model!r} not found at {self.base_url}", 404)
        return BackendError("backend_error", f"{type(exc).__name__}: {exc}")

    async def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        model: str | None,
        cache_key: str | None = None,
        *,
        extra_body: dict[str, Any] | None = None,
    ) -> AsyncIterator[Chunk]:
        try:
            create: Any = self.client.chat.completions.create
            response = await create(
                model=model or self.model,
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra_body,
            )
            finish, deltas, usage_sent = "stop", 0, False
            async with response:
                async for part in response:
                    if part.choices:
                        choice = part.choices[0]
                        finish = choice.finish_reason or finish
                        if choice.delta and choice.delta.content:
                            deltas += 1
                            yield Chunk(text=choice.delta.content)
                    if part.usage:
                        usage_sent = True
                        yield Chunk(
                            prompt_tokens=part.usage.prompt_tokens,
                            completion_tokens=part.usage.completion_tokens,
                            finish_reason=finish,
                        )
            if not usage_sent:  # servers that ignore include_usage (llama.cpp's): count the deltas
                yield Chunk(prompt_tokens=0, completion_tokens=deltas, finish_reason=finish)
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(exc) from None


class LlamaServerBackend(OpenAIBackend):
    """llama.cpp's server as a child process (`llama_server.LlamaServer`): several generations at once,
    batched, each conversation's prompt kept in a slot's cache. Spoken to over its OpenAI API."""

    name = "llama-server"
    serves_one_model = True

    def __init__(self, server: LlamaServer, model: str, warmup_system_prompt: str | None = None) -> None:
        server.start()
        # llama-server (cpp-httplib) closes a connection idle for 5 s, httpx reuses one for up to 5 s: a request
        # at that moment went out on a closed connection ("Connection error", once in a 4-session run)
        super().__init__(f"{server.url}/v1", "unused", model, connect_timeout=2.0, keepalive_s=2.0)
        self.server = server
        self.slots = SlotAffinity(server.parallel)
        if warmup_system_prompt:  # the system prompt is in every slot's cache before the first user speaks
            import httpx

            messages = [{"role": "system", "content": warmup_system_prompt}, {"role": "user", "content": "Hi"}]
            for slot in range(server.parallel):
                body = {"messages": messages, "max_tokens": 1, "id_slot": slot}
                httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).raise_for_status()

    async def stream(
        self,
        messages: list[dict[str, str]],
        temperature: float,
        max_tokens: int,
        model: str | None,
        cache_key: str | None = None,
        *,
        extra_body: dict[str, Any] | None = None,
    ) -> AsyncIterator[Chunk]:
        slot = self.slots.acquire(cache_key)
        try:
            body = {**(extra_body or {}), "id_slot": slot}
            async for chunk in super().stream(messages, temperature, max_tokens, model, extra_body=body):
                yield chunk
        finally:
            self.slots.release(slot, cache_key)

    def _error(self, exc: Exception) -> BackendError:
        import openai

        if isinstance(exc, openai.APIConnectionError | openai.InternalServerError) and not self.server.alive():
            return BackendError("backend_unreachable", "the local llama-server is restarting", 503)
        return super()._error(exc)

    def health(self) -> dict[str, Any]:
        proc = self.server.proc
        return {
            "server_alive": self.server.alive(),
            "server_restarts": self.server.restarts,
            "server_pid": proc.pid if proc else None,
        }

    def close(self) -> None:
        self.server.stop()


class SlotAffinity:
    """Which llama-server slot serves a generation. A conversation (its cache key) goes back to the slot
    that holds its prompt — even while that slot is still finishing a cancelled generation of the same
    conversation (a dropped speculative reply), which llama-server ends within a token. Left to itself,
    the server would pick another slot by prompt similarity and evaluate the whole history again
    (~1 s on 2 cores for 80 tokens, measured). A new conversation, or one whose slot is busy with
    another conversation, takes the free slot used least recently."""

    def __init__(self, slots: int) -> None:
        self.busy: list[list[str | None]] = [[] for _ in range(slots)]  # keys generating, per slot
        self.last_used = [0.0] * slots
        self.owner: dict[str, int] = {}  # key -> the slot that last served it

    def acquire(self, key: str | None) -> int:
        slot = self.owner.get(key) if key is not None else None
        if slot is None or any(k != key for k in self.busy[slot]):
            free = [i for i, keys in enumerate(self.busy) if not keys]
            slot = min(free or range(len(self.busy)), key=lambda i: self.last_used[i])
        if key is not None:
            self.owner = {k: s for k, s in self.owner.items() if s != slot}  # its cache is about to change
            self.owner[key] = slot
        self.busy[slot].append(key)
        self.last_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int, key: str | None) -> None:
        self.busy[slot].remove(key)
