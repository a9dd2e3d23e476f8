"""LLM benchmark: per-stream time to first token and aggregate tokens/s at 1, 2 and 4 streams at once, for
each local engine (llama.cpp's server with continuous batching; llama.cpp in-process, one at a time), over
the service's WebSocket with short voice-style questions.

    python scripts/bench_llm.py [--backends llama-server embedded] [--streams 1 2 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from _bench import median, pct, say, services

QUESTIONS = [
    "What is a good name for a black cat?",
    "How far is the moon from the earth?",
    "Give me a quick tip for sleeping better.",
    "What should I cook tonight with rice and eggs?",
    "Why is the sky blue?",
    "How do I keep basil alive indoors?",
    "What is a fun thing to do on a rainy day?",
    "How long should I boil an egg?",
]


async def one(url: str, question: str) -> tuple[float, float, int]:
    """(ms to the first token, ms to the end, tokens) of one generation."""
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        t0 = time.perf_counter()
        request = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0.6}
        await ws.send(json.dumps({"type": "request", **request}))
        first, tokens = None, 0
        while True:
            ev = json.loads(await ws.recv())
            if ev["type"] == "token":
                first = first or time.perf_counter()
                tokens += 1
            elif ev["type"] == "done":
                assert first is not None
                return (first - t0) * 1000, (time.perf_counter() - t0) * 1000, tokens
            else:
                raise RuntimeError(ev)


async def round_of(url: str, streams: int, offset: int) -> tuple[list[float], float]:
    """`streams` generations started together: their first-token times and the aggregate tokens/s."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(url, QUESTIONS[(offset + i) % len(QUESTIONS)]) for i in range(streams)))
    wall = time.perf_counter() - t0
    return [r[0] for r in results], sum(r[2] for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["llama-server", "embedded"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    say("LLM benchmark (Qwen2.5-Coder 0.5B Instruct Q4_K_M, 2 threads, 64 tokens per reply)")
    for backend in args.backends:
        with services("llm", LLM_BACKEND=backend) as procs:
            url = procs["llm"].url
            asyncio.run(one(url, "Hi"))  # warm up
            for streams in args.streams:
                ttft: list[float] = []
                rates: list[float] = []
                for r in range(args.rounds):
                    firsts, rate = asyncio.run(round_of(url, streams, r * streams))
                    ttft += firsts
                    rates.append(rate)
                say(
                    f"  {backend:12s} {streams} stream(s): first token median {median(ttft):.0f} ms, "
                    f"p95 {pct(ttft, 0.95):.0f} ms; aggregate {median(rates):.1f} tokens/s"
                )


if __name__ == "__main__":
    main()
