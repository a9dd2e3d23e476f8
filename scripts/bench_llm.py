"""LLM benchmark: time to first token and tokens per second for the embedded model, over the service's
WebSocket (a short voice-style conversation, so the prompt is realistic)."""

from __future__ import annotations

import asyncio
import json
import time

from _bench import median, say, services

QUESTIONS = [
    "What is a good name for a black cat?",
    "How far is the moon from the earth?",
    "Give me a quick tip for sleeping better.",
    "What should I cook tonight with rice and eggs?",
    "Why is the sky blue?",
]


async def one(url: str, question: str) -> tuple[float, float, int]:
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        t0 = time.perf_counter()
        await ws.send(
            json.dumps(
                {
                    "type": "request",
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": 96,
                    "temperature": 0.6,
                }
            )
        )
        first, tokens = None, 0
        while True:
            ev = json.loads(await ws.recv())
            if ev["type"] == "token":
                first = first or time.perf_counter()
                tokens += 1
            elif ev["type"] == "done":
                end = time.perf_counter()
                assert first is not None
                return (first - t0) * 1000, (tokens - 1) / max(1e-6, end - first), tokens


def main() -> None:
    say("LLM benchmark (embedded llama.cpp, Qwen2.5-Coder 0.5B Instruct Q4_K_M, 2 threads)")
    with services("llm") as procs:
        url = procs["llm"].url
        asyncio.run(one(url, "Hi"))  # warm up
        results = [asyncio.run(one(url, q)) for q in QUESTIONS]
    for q, (ttft, tps, n) in zip(QUESTIONS, results, strict=True):
        say(f"  {q[:42]:42s} first token {ttft:4.0f} ms, {tps:5.1f} tokens/s ({n} tokens)")
    ttft, tps = median([r[0] for r in results]), median([r[1] for r in results])
    say(f"  median: first token {ttft:.0f} ms, {tps:.1f} tokens/s")


if __name__ == "__main__":
    main()
