"""A small Ollama-protocol test server (fake): no registry ships the Ollama server itself.

Speaks the parts of Ollama's API our `ollama` backend uses: GET /api/tags and POST /api/chat with
NDJSON streaming. Models: `tiny` (echoes), `slow` (one token every 100 ms), `broken` (an error line
in the middle of the stream). Any other model gets Ollama's 404 "not found" error.
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
MODELS = ["tiny:latest", "slow:latest", "broken:latest"]
produced = {"tokens": 0}


def _name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


@app.get("/api/tags")
async def tags() -> dict[str, object]:
    return {"models": [{"name": m, "model": m, "size": 1, "digest": "0" * 64, "details": {}} for m in MODELS]}


@app.get("/debug/produced")
async def debug_produced() -> dict[str, int]:
    return produced


@app.post("/api/chat")
async def chat(request: Request) -> object:
    body = await request.json()
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
    words = words[:limit]

    def line(content: str, done: bool = False) -> str:
        msg = {
            "model": model,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "message": {"role": "assistant", "content": content},
            "done": done,
        }
        if done:
            msg.update(
                {
                    "done_reason": "stop",
                    "prompt_eval_count": len(json.dumps(body["messages"])) // 4,
                    "eval_count": len(words),
                    "total_duration": 1,
                }
            )
        return json.dumps(msg) + "\n"

    if not body.get("stream", True):
        return JSONResponse(json.loads(line("".join(words), done=True)))

    async def stream() -> AsyncIterator[str]:
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
