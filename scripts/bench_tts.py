"""TTS benchmark: real-time factor and time to first audio for a short and a long sentence, over REST
and over the WebSocket with the text arriving token by token (as from an LLM at ~40 tokens/s); a
40-word text over REST alone (first audio and all of it) and four at once.

    python scripts/bench_tts.py       (TTS_THREADS=1 to compare with one core per synthesis)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _bench import median, say, services

SHORT = "Sure, I can help with that."
LONG = (
    "The museum opens at nine in the morning, and on weekends it stays open until eight in the evening, "
    "so you will have plenty of time to see the new exhibition about ancient ships."
)


FORTY = (
    "Thanks for asking. Tomorrow looks mostly sunny in the morning, with a few clouds rolling in after lunch. "
    "It should stay dry, and the temperature will reach about twenty degrees, so a light jacket is all you "
    "need for the evening walk."
)


def rest_total(url: str, text: str) -> tuple[float, float]:
    """(ms to the first audio byte, ms to the last) for POST /v1/audio/speech with streamed PCM."""
    t0 = time.perf_counter()
    first = None
    with httpx.stream(
        "POST", f"{url}/v1/audio/speech", json={"input": text, "response_format": "pcm"}, timeout=120
    ) as r:
        for _ in r.iter_bytes():
            first = first or time.perf_counter()
    return ((first or t0) - t0) * 1000, (time.perf_counter() - t0) * 1000


def rest(url: str, text: str) -> tuple[float, float]:
    """(time to first audio byte, RTF) for POST /v1/audio/speech with streamed PCM."""
    t0 = time.perf_counter()
    first = None
    size = 0
    with httpx.stream(
        "POST", f"{url}/v1/audio/speech", json={"input": text, "response_format": "pcm"}, timeout=60
    ) as r:
        for chunk in r.iter_bytes():
            first = first or time.perf_counter()
            size += len(chunk)
    total = time.perf_counter() - t0
    return ((first or t0) - t0) * 1000, total / (size / 2 / 24000)


async def ws(url: str, text: str, token_s: float = 0.025) -> tuple[float, float]:
    """(first audio after the first token was sent, RTF over the whole stream)."""
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/ws") as sock:
        await sock.send(json.dumps({"type": "start"}))
        rate = json.loads(await sock.recv())["format"]["rate"]
        t0 = time.perf_counter()
        first = None
        size = 0

        async def read() -> None:
            nonlocal first, size
            while True:
                msg = await sock.recv()
                if isinstance(msg, bytes):
                    first = first or time.perf_counter()
                    size += len(msg)
                elif json.loads(msg)["type"] == "done":
                    return

        reader = asyncio.create_task(read())
        for token in text.split(" "):
            await sock.send(json.dumps({"type": "text", "text": token + " "}))
            await asyncio.sleep(token_s)
        await sock.send(json.dumps({"type": "stop"}))
        await reader
        total = time.perf_counter() - t0
        return ((first or t0) - t0) * 1000, total / (size / 2 / rate)


def main() -> None:
    threads = os.environ.get("TTS_THREADS", "0")
    say(f"TTS benchmark (piper 1.8.0, en_US-joe-medium, TTS_THREADS={threads}: 0 = every core when alone)")
    with services("tts") as procs:
        url = procs["tts"].url
        rest(url, SHORT)  # warm up
        runs = [rest_total(url, FORTY) for _ in range(5)]
        say(
            f"  REST 40 words, alone: first audio {median([r[0] for r in runs]):.0f} ms, "
            f"all of it {median([r[1] for r in runs]):.0f} ms (median of 5)"
        )
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda _: rest_total(url, FORTY), range(4)))
        say(
            f"  REST 40 words, 4 at once: first audio median {median([r[0] for r in together]):.0f} ms, "
            f"all of it median {median([r[1] for r in together]):.0f} ms"
        )
        for name, text in (("short", SHORT), ("long", LONG)):
            runs = [rest(url, text) for _ in range(3)]
            say(
                f"  REST {name:5s} ({len(text):3d} chars): first audio {median([r[0] for r in runs]):.0f} ms, "
                f"RTF {median([r[1] for r in runs]):.3f}"
            )
        for name, text in (("short", SHORT), ("long", LONG)):
            runs = [asyncio.run(ws(url, text)) for _ in range(3)]
            say(
                f"  WebSocket {name:5s}, token by token: first audio {median([r[0] for r in runs]):.0f} ms after the"
                f" first token, wall time / audio time {median([r[1] for r in runs]):.3f}"
            )


if __name__ == "__main__":
    main()
