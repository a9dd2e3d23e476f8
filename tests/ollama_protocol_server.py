"""A small Ollama-protocol test server (fake): no registry ships the Ollama server itself.

Speaks the parts of Ollama's API our `ollama` backend uses: GET /api/tags, POST /api/chat with NDJSON
streaming, POST /api/pull with progress. Models: `tiny` (echoes), `slow` (one token every 100 ms),
`broken` (an error line in the middle of the stream), `thinker` (a reasoning model, like qwen3: unless
the request says `think: false` it first streams 300 tokens of `message.thinking`, which count against
`num_predict` as Ollama's do). `pullable` is not there until pulled. Any other model gets Ollama's 404.
Run: python -m uvicorn tests.ollama_protocol_server:app --port 11434
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()
MODELS = ["tiny:latest", "slow:latest", "broken:latest", "thinker:latest"]
PULLABLE = ["pullable:latest"]
produced = {"tokens": 0}
requests: list[dict[str, object]] = []  # what the backend sent, for the tests (GET /debug/requests)


def _name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


@app.get("/api/tags")
async def tags() -> dict[str, object]:
    return {"models": [{"name": m, "model": m, "size": 1, "digest": "0" * 64, "details": {}} for m in MODELS]}


@app.get("/debug/produced")
async def debug_produced() -> dict[str, int]:
    return produced


@app.get("/debug/requests")
async def debug_requests() -> list[dict[str, object]]:
    return requests


@app.post("/api/pull")
async def pull(request: Request) -> object:
    body = await request.json()
    model = _name(body.get("model", ""))
    if model not in PULLABLE + MODELS:
        return JSONResponse({"error": "pull model manifest: file does not exist"}, status_code=500)

    async def progress() -> AsyncIterator[str]:
        yield json.dumps({"status": "pulling manifest"}) + "\n"
        for done in range(0, 101, 25):
            yield json.dumps({"status": "pulling 0123abcd", "digest": "sha256:0123", "total": 100, "completed": done})
            yield "\n"
            await asyncio.sleep(0.05)
        if model not in MODELS:
            MODELS.append(model)
        yield json.dumps({"status": "success"}) + "\n"

    return StreamingResponse(progress(), media_type="application/x-ndjson")


@app.post("/api/chat")
async def chat(request: Request) -> object:
    body = await request.json()
    requests.append(body)
    model = _name(body.get("model", ""))
    if model not in MODELS:
        return JSONResponse({"error": f"model '{body.get('model')}' not found, try pulling it first"}, status_code=404)
    last = body["messages"][-1]["content"]
    words = (
        (["You", " said:"] + [f" {w}" for w in last.split()])
        if model != "slow:latest"
        else [f" {i}" for i in range(200)]
    )
    limit = body.get("options", {}).get("num_predict") or 10_000
    thinks = model.startswith("thinker") and body.get("think") is not False  # unset: a thinking model thinks
    thoughts = [" Hmm, let me think about what they said."] * 300 if thinks else []
    thoughts, words = thoughts[:limit], words[: max(0, limit - len(thoughts))]

    def line(content: str, done: bool = False, thinking: str = "") -> str:
        message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
        msg = {"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "message": message, "done": done}
        if done:
            msg.update(
                {
                    "done_reason": "stop",
                    "prompt_eval_count": len(json.dumps(body["messages"])) // 4,
                    "eval_count": len(thoughts) + len(words),
                    "total_duration": 1,
                }
            )
        return json.dumps(msg) + "\n"

    if not body.get("stream", True):
        return JSONResponse(json.loads(line("".join(words), done=True, thinking="".join(thoughts))))

    async def stream() -> AsyncIterator[str]:
        for thought in thoughts:
            await asyncio.sleep(0.005)
            yield line("", thinking=thought)
        for i, word in enumerate(words):
            if model == "broken:latest" and i == 3:
                yield json.dumps({"error": "an error occurred in the middle of the stream"}) + "\n"
                return
            if model == "slow:latest":
                await asyncio.sleep(0.1)
            produced["tokens"] += 1
            yield line(word)
        yield line("", done=True)

    return StreamingResponse(stream(), media_type="application/x-ndjson")
