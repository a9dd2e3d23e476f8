"""LLM service: the local model over all three APIs with both local engines (llama.cpp's server as a child
process, llama.cpp in-process), batching and cancel on the server, the ollama backend against the
Ollama-protocol test server (a fake, since no registry ships Ollama), the openai backend against
llama_cpp.server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import websockets
from voice_common.settings import REPO_ROOT, default_models_dir

from devtools.launcher import health
from tests.helpers import free_port

GGUF = default_models_dir() / "llm" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
ASK: Any = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
COUNT: Any = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


def spawn(args: list[str], port: int, name: str) -> Iterator[str]:
    log = (REPO_ROOT / "test-artifacts" / f"{name}-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited")
            if health(url + ("/api/tags" if name == "ollama" else "/v1/models")) == 200:
                break
            import time

            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module", params=["llama-server", "embedded"])
def llm(request, start_service):
    # the default (llama-server) is started with no env, so other modules share the same process
    return start_service("llm") if request.param == "llama-server" else start_service("llm", LLM_BACKEND="embedded")


@pytest.fixture(scope="module")
def server_llm(start_service):
    return start_service("llm")


async def info(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return dict((await client.get(f"{url}/info")).json())


async def busy_slots(llm_url: str) -> int:
    """llama-server's own view: how many of its slots are generating."""
    server = (await info(llm_url))["base_url"].removesuffix("/v1")
    async with httpx.AsyncClient() as client:
        return sum(s["is_processing"] for s in (await client.get(f"{server}/slots")).json())


async def assert_generation_stopped(llm_url: str, counted: float | None) -> None:
    """Nothing is generated any more: the embedded model's token counter stands still, or no server slot
    is busy. A generation left running would go on for seconds (400 tokens at ~40/s)."""
    if (await info(llm_url))["backend"] == "embedded":
        await asyncio.sleep(1.0)
        assert await backend_tokens(llm_url) == counted
        return
    for _ in range(20):
        if await busy_slots(llm_url) == 0:
            break
        await asyncio.sleep(0.05)
    assert await busy_slots(llm_url) == 0
    await asyncio.sleep(0.5)
    assert await busy_slots(llm_url) == 0


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[str]:
    port = free_port()
    yield from spawn(["uvicorn", "tests.ollama_protocol_server:app", "--port", str(port)], port, "ollama")


@pytest.fixture(scope="module")
def ollama_llm(start_service, fake_ollama):
    return start_service(
        "llm",
        LLM_BACKEND="ollama",
        OLLAMA_BASE_URL=fake_ollama,
        LLM_OLLAMA_MODEL="tiny",
        LLM_MAX_CONCURRENT="1",
        LLM_MAX_QUEUE="0",
        LLM_FIRST_TOKEN_TIMEOUT_S="5",
    )


async def backend_tokens(url: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    return float(re.search(r"^llm_backend_tokens (\S+)", text, re.M).group(1))  # type: ignore[union-attr]


async def test_generate_json_and_sse(llm) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{llm.url}/generate", json={"messages": ASK, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and "paris" in body["response"].lower()
        assert body["usage"]["prompt_tokens"] > 10 and body["usage"]["completion_tokens"] > 0
        assert 0 < body["timings"]["first_token_ms"] <= body["timings"]["total_ms"]
        events = []
        async with client.stream(
            "POST", f"{llm.url}/generate", json={"messages": ASK, "stream": True, "temperature": 0}
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(e["type"] == "token" for e in parsed[:-1]) and len(parsed) > 3
    assert parsed[-1]["type"] == "done" and parsed[-1]["usage"]["completion_tokens"] > 0
    assert "paris" in "".join(e["text"] for e in parsed[:-1]).lower()


def test_openai_client_stream_and_not(llm) -> None:
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    reply = client.chat.completions.create(model=model, messages=ASK, temperature=0)
    assert reply.object == "chat.completion" and "paris" in (reply.choices[0].message.content or "").lower()
    assert reply.usage is not None and reply.usage.total_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=ASK,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices  # as OpenAI: usage last
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "paris" in text.lower()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "assistant", "content": "hi"}])
    # the voice persona only when the client brings no system message of its own
    own: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with_own = client.chat.completions.create(model=model, messages=own, max_tokens=1).usage
    without = client.chat.completions.create(model=model, messages=own[1:], max_tokens=1).usage
    assert with_own is not None and without is not None
    assert without.prompt_tokens > with_own.prompt_tokens + 20  # the persona is ~50 tokens
    with pytest.raises(openai.NotFoundError) as unknown:  # a local engine has one model: say so, never ignore
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert unknown.value.code == "model_not_found" and model in unknown.value.message


async def test_websocket_tokens_and_cancel_stops_generation(llm) -> None:
    embedded = (await info(llm.url))["backend"] == "embedded"
    async with websockets.connect(llm.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "request", "messages": ASK, "temperature": 0}))
        events = []
        while (ev := json.loads(await ws.recv()))["type"] != "done":
            events.append(ev)
        assert "paris" in "".join(e["text"] for e in events).lower()

        before = await backend_tokens(llm.url)
        await ws.send(json.dumps({"type": "request", "messages": COUNT, "max_tokens": 400}))
        received = 0
        while received < 5:
            if json.loads(await ws.recv())["type"] == "token":
                received += 1
        await ws.send(json.dumps({"type": "cancel"}))
        while (ev := json.loads(await ws.recv()))["type"] != "cancelled":
            received += ev["type"] == "token"
        await asyncio.sleep(0.5)
        at_cancel = await backend_tokens(llm.url)
        await assert_generation_stopped(llm.url, at_cancel)  # generation really stopped
        if embedded:
            assert at_cancel - before - received <= 3, (at_cancel - before, received)

        # the socket still works after a cancel (counting never ends within 5 tokens; "Paris." could)
        await ws.send(json.dumps({"type": "request", "messages": COUNT, "max_tokens": 5}))
        while (ev := json.loads(await ws.recv()))["type"] != "done":
            assert ev["type"] == "token"
        assert ev["finish_reason"] == "length"

    # the client going away stops generation too
    before = await backend_tokens(llm.url)
    async with websockets.connect(llm.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "request", "messages": COUNT, "max_tokens": 400}))
        for _ in range(3):
            await ws.recv()
    await asyncio.sleep(1.0)
    stopped = await backend_tokens(llm.url)
    await assert_generation_stopped(llm.url, stopped)
    assert stopped - before < 40


async def stream_tokens(url: str, messages: Any, max_tokens: int, log: list[tuple[int, str]], i: int) -> str:
    """One WebSocket generation; appends (i, event type) to the shared `log` as events arrive."""
    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        request = {"type": "request", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        await ws.send(json.dumps(request))
        while (ev := json.loads(await ws.recv()))["type"] == "token":
            log.append((i, "token"))
        log.append((i, ev["type"]))
        return str(ev.get("finish_reason", ev["type"]))


async def test_llama_server_generates_four_conversations_at_once(server_llm) -> None:
    assert (await info(server_llm.url))["max_concurrent"] == 4
    log: list[tuple[int, str]] = []
    questions = [
        [{"role": "user", "content": q}]
        for q in (f"Count from {n} to {n + 100}, separated by commas." for n in (1, 200, 500, 1000))
    ]
    finishes = await asyncio.gather(*(stream_tokens(server_llm.url, q, 40, log, i) for i, q in enumerate(questions)))
    assert set(finishes) <= {"length", "stop"}, finishes
    first_done = next(n for n, (_, kind) in enumerate(log) if kind == "done")
    started = {i for i, kind in log[:first_done] if kind == "token"}
    assert started == {0, 1, 2, 3}, log[: first_done + 1]  # every one was streaming before any finished


async def test_llama_server_cancelling_one_generation_leaves_the_others(server_llm) -> None:
    url = server_llm.url.replace("http", "ws") + "/ws"
    async with websockets.connect(url) as victim:
        await victim.send(json.dumps({"type": "request", "messages": COUNT, "max_tokens": 400}))
        log: list[tuple[int, str]] = []
        others = [asyncio.create_task(stream_tokens(server_llm.url, COUNT, 60, log, i)) for i in range(2)]
        for _ in range(3):
            assert json.loads(await victim.recv())["type"] == "token"
        await victim.send(json.dumps({"type": "cancel"}))
        while json.loads(await victim.recv())["type"] != "cancelled":
            pass
        assert await asyncio.gather(*others) == ["length", "length"]
    assert sum(1 for i, kind in log if kind == "token" and i == 0) >= 55  # a token per delta, about 60
    await assert_generation_stopped(server_llm.url, None)


async def test_llama_server_dies_with_the_service(start_service) -> None:
    """Even a SIGKILLed LLM service leaves no llama-server behind (holding a port and memory)."""
    import os
    import signal

    svc = start_service("llm", LLM_PARALLEL="2")  # a process of its own, killed here
    async with httpx.AsyncClient(timeout=30) as client:
        child = (await client.get(f"{svc.url}/healthz")).json()["server_pid"]
    assert svc.proc is not None
    os.kill(svc.proc.pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


async def test_llama_server_is_restarted_when_it_dies(start_service) -> None:
    import os
    import signal

    svc = start_service("llm", LLM_PARALLEL="1")  # a process of its own: the others keep theirs
    r = None
    async with httpx.AsyncClient(timeout=120) as client:
        health = (await client.get(f"{svc.url}/healthz")).json()
        assert health["server_alive"] and health["server_restarts"] == 0
        os.kill(health["server_pid"], signal.SIGKILL)
        for _ in range(300):
            health = (await client.get(f"{svc.url}/healthz")).json()
            if health["server_restarts"] == 1 and health["server_alive"]:
                r = await client.post(f"{svc.url}/generate", json={"messages": ASK, "max_tokens": 8})
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unreachable", r.text
            await asyncio.sleep(0.1)
        assert r is not None and r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": []}, "empty_messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid_request"),
        ({"messages": [{"role": "user", "content": "  "}]}, "empty_content"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "last_message_not_user",
        ),
        ({"messages": [{"role": "user"}]}, "invalid_request"),
        ({"messages": ASK, "temperature": 5}, "invalid_request"),
        ({"messages": ASK, "max_tokens": 0}, "invalid_request"),
    ],
)
async def test_validation_errors(llm, body, code) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{llm.url}/generate", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


async def test_a_message_beyond_the_context_is_cut_not_fatal(llm) -> None:
    """2,500 emoji pass main-app's 4,000-character limit but not the model's 2,048-token context."""
    flood = [{"role": "user", "content": "\U0001f600" * 2500 + " What is the capital of France?"}]
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{llm.url}/generate", json={"messages": flood, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
        r = await client.post(f"{llm.url}/generate", json={"messages": ASK, "temperature": 0})
        assert r.status_code == 200 and "paris" in r.json()["response"].lower()  # and the engine is fine after


async def test_a_huge_body_is_refused_at_once(server_llm) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * 3_000_000}]}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{server_llm.url}/generate", json=huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text


async def test_websocket_bad_events(llm) -> None:
    async with websockets.connect(llm.url.replace("http", "ws") + "/ws") as ws:
        await ws.send("nope")
        assert json.loads(await ws.recv())["code"] == "bad_event"
        await ws.send(json.dumps({"type": "request", "messages": []}))
        assert json.loads(await ws.recv())["code"] == "empty_messages"
        await ws.send(b"\x00")
        assert json.loads(await ws.recv())["code"] == "unexpected_audio"


async def test_ollama_backend_against_protocol_server(ollama_llm, fake_ollama) -> None:
    url = ollama_llm.url
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{url}/generate", json={"messages": [{"role": "user", "content": "hello there"}]})
        assert r.status_code == 200 and r.json()["response"] == "You said: hello there"
        assert r.json()["usage"]["completion_tokens"] == 4
        health = (await client.get(f"{url}/healthz")).json()
        assert health["backend_reachable"] and health["model_available"]
        r = await client.post(f"{url}/generate", json={"messages": ASK, "model": "qwen3:14b"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "ollama pull" in r.json()["error"]["message"]
        # an error line in the middle of the stream
        events = []
        async with client.stream(
            "POST", f"{url}/generate", json={"messages": ASK, "model": "broken", "stream": True}
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        kinds = [json.loads(e).get("type") for e in events[:-1]]
        assert kinds == ["token", "token", "token", "error"] and events[-1] == "[DONE]"
        assert "middle of the stream" in json.loads(events[-2])["error"]["message"]
        # busy: one at a time, no queue -> 503 with Retry-After
        slow = {"messages": ASK, "model": "slow", "max_tokens": 10}
        results = await asyncio.gather(*(client.post(f"{url}/generate", json=slow) for _ in range(3)))
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and codes[-1] == 503
        assert next(r for r in results if r.status_code == 503).headers["retry-after"]
    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "request", "messages": ASK, "model": "broken"}))
        kinds = [json.loads(await ws.recv())["type"] for _ in range(4)]
        assert kinds == ["token", "token", "token", "error"]
        # cancel stops the backend stream: the fake stops producing tokens
        await ws.send(json.dumps({"type": "request", "messages": ASK, "model": "slow"}))
        for _ in range(3):
            await ws.recv()
        await ws.send(json.dumps({"type": "cancel"}))
        while json.loads(await ws.recv())["type"] != "cancelled":
            pass
        async with httpx.AsyncClient() as client:
            await asyncio.sleep(0.3)
            produced = (await client.get(f"{fake_ollama}/debug/produced")).json()["tokens"]
            await asyncio.sleep(0.5)
            assert (await client.get(f"{fake_ollama}/debug/produced")).json()["tokens"] == produced


async def test_ollama_thinking_model_answers_at_once_never_with_its_reasoning(start_service, fake_ollama) -> None:
    """Ollama lets a model like qwen3 think unless told not to; the reply budget then goes to hidden
    reasoning. The backend says `think: false` (and warms the model up at start)."""
    llm = start_service("llm", LLM_BACKEND="ollama", OLLAMA_BASE_URL=fake_ollama, LLM_OLLAMA_MODEL="thinker")
    async with httpx.AsyncClient(timeout=30) as client:
        seen = len((await client.get(f"{fake_ollama}/debug/requests")).json())
        r = await client.post(f"{llm.url}/generate", json={"messages": [{"role": "user", "content": "hello there"}]})
        assert r.status_code == 200 and r.json()["response"] == "You said: hello there" and "thinking" not in r.json()
        assert r.json()["timings"]["first_token_ms"] < 500
        sent = (await client.get(f"{fake_ollama}/debug/requests")).json()
    warm_up = [b for b in sent[:seen] if b["model"] == "thinker" and b["messages"][0]["role"] == "system"]
    assert warm_up and warm_up[0]["keep_alive"] and warm_up[0]["options"]["num_predict"] == 1
    assert sent[seen]["think"] is False


async def test_ollama_thinking_when_asked_is_streamed_apart_and_never_spoken(start_service, fake_ollama) -> None:
    llm = start_service(
        "llm", LLM_BACKEND="ollama", OLLAMA_BASE_URL=fake_ollama, LLM_OLLAMA_MODEL="thinker", LLM_OLLAMA_THINK="1"
    )
    request = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 400, "stream": True}
    events = []
    async with httpx.AsyncClient(timeout=30) as client, client.stream("POST", f"{llm.url}/generate", json=request) as r:
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds.index("thinking") < kinds.index("token") and kinds[-1] == "done"
    spoken = "".join(e["text"] for e in events if e["type"] == "token")
    assert spoken == "You said: hello there" and "think" not in spoken
    async with websockets.connect(llm.url.replace("http", "ws") + "/ws") as ws:  # main-app's socket: the same
        await ws.send(json.dumps({"type": "request", **request}))
        while (event := json.loads(await ws.recv()))["type"] != "done":
            assert event["type"] in ("thinking", "token")


async def test_ollama_missing_model_is_named_with_the_pull_command_or_pulled(start_service, fake_ollama) -> None:
    missing = start_service("llm", LLM_BACKEND="ollama", OLLAMA_BASE_URL=fake_ollama, LLM_OLLAMA_MODEL="absent")
    assert missing.log_path is not None and "ollama pull absent" in missing.log_path.read_text()
    pulled = start_service(
        "llm", LLM_BACKEND="ollama", OLLAMA_BASE_URL=fake_ollama, LLM_OLLAMA_MODEL="pullable", LLM_OLLAMA_PULL="1"
    )
    log = pulled.log_path.read_text() if pulled.log_path else ""
    assert "ollama pull pullable: pulling 0123abcd 50%" in log and "pullable loaded" in log
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{pulled.url}/healthz")).json()["model_available"] is True
        r = await client.post(f"{pulled.url}/generate", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["response"] == "You said: hi"


async def test_ollama_host_down(start_service) -> None:
    down = start_service(
        "llm", LLM_BACKEND="ollama", OLLAMA_BASE_URL=f"http://127.0.0.1:{free_port()}", LLM_CONNECT_TIMEOUT_S="1"
    )
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{down.url}/generate", json={"messages": ASK})
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unreachable"
        health = (await client.get(f"{down.url}/healthz")).json()
        assert health["backend_reachable"] is False
    async with websockets.connect(down.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "request", "messages": ASK}))
        ev = json.loads(await ws.recv())
        assert ev["type"] == "error" and ev["code"] == "backend_unreachable" and ev["service"] == "llm"


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    port = free_port()
    yield from spawn(
        [
            "llama_cpp.server",
            "--model",
            str(GGUF),
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "qwen-local",
            "--n_threads",
            "2",
        ],
        port,
        "llama_cpp_server",
    )


async def test_openai_backend_against_llama_cpp_server(start_service, llama_server) -> None:
    svc = start_service(
        "llm", LLM_BACKEND="openai", LLM_OPENAI_BASE_URL=f"{llama_server}/v1", LLM_OPENAI_MODEL="qwen-local"
    )
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{svc.url}/generate", json={"messages": ASK, "temperature": 0})
        assert r.status_code == 200 and "paris" in r.json()["response"].lower(), r.text
        assert r.json()["usage"]["completion_tokens"] > 0
        models = (await client.get(f"{svc.url}/v1/models")).json()
        assert models["data"][0]["id"] == "qwen-local"
    async with websockets.connect(svc.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "request", "messages": ASK, "temperature": 0}))
        tokens = []
        while (ev := json.loads(await ws.recv()))["type"] == "token":
            tokens.append(ev["text"])
        assert ev["type"] == "done" and len(tokens) > 2 and "paris" in "".join(tokens).lower()
