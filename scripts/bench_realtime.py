"""Voice-to-voice through OpenAI's Realtime API (`WS /v1/realtime`, the official `openai` client) against
the browser socket (`WS /ws`), on the same stack and the same recorded questions, turns alternating so
both see the same machine: end of the user's speech -> first reply audio at the client.

    python scripts/bench_realtime.py [--turns 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from typing import Any

import numpy as np
from _bench import median, pct, say, services
from bench_voice import one_turn, speech_end_ms
from main_app.client import VoiceClient
from openai import AsyncOpenAI
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import Clip, librivox_clips, silence

FRAME = 480 * 2  # 20 ms of PCM16 at 24 kHz


async def realtime_turn(conn: Any, clip: Clip) -> float:
    """Stream one question in real time as base64 PCM16 at 24 kHz; ms from the end of its speech to the
    first audio delta of the response."""
    lead = 400
    speech16, _ = load_mono(clip.data, 16000)
    speech24, _ = load_mono(clip.data, 24000)
    pcm = float32_to_pcm16(np.concatenate([silence(lead, 24000), speech24, silence(2000, 24000)]))
    t0 = time.monotonic()
    end_of_speech = t0 + (lead + speech_end_ms(speech16)) / 1000

    async def send() -> None:
        for i in range(0, len(pcm), FRAME):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + FRAME]).decode())
            await asyncio.sleep(max(0.0, t0 + (i + FRAME) / 48000 - time.monotonic()))

    sender = asyncio.create_task(send())
    first: float | None = None
    async with asyncio.timeout(120):
        async for event in conn:
            if event.type == "response.output_audio.delta" and first is None and time.monotonic() > end_of_speech:
                first = time.monotonic()
            elif event.type == "response.done" and first is not None:
                break
    await sender
    assert first is not None
    return (first - end_of_speech) * 1000


async def run(app_url: str, turns: int, rounds: int) -> dict[str, list[float]]:
    clips = librivox_clips()
    results: dict[str, list[float]] = {"browser socket (/ws)": [], "Realtime API (/v1/realtime)": []}
    browser = VoiceClient(app_url.replace("http", "ws") + "/ws")
    await browser.connect()
    client = AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused")
    async with client.realtime.connect(model="voicechat") as conn:
        for r in range(rounds):
            for i in range(turns):
                clip = clips[i % len(clips)]
                row = await one_turn(browser, clip)
                if row is not None:
                    results["browser socket (/ws)"].append(row["v2v_ms"])
                await asyncio.sleep(1.0)
                results["Realtime API (/v1/realtime)"].append(await realtime_turn(conn, clip))
                await asyncio.sleep(1.0)
                say(f"  round {r + 1}, question {i + 1}: done")
    await browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    say("Realtime API against the browser socket (all five services, one session each, turns alternating)")
    with services("vad", "stt", "tts", "llm") as procs:
        env = {f"APP_{k.upper()}_URL": p.url for k, p in procs.items()}
        with services("main-app", APP_DATA_DIR="data/bench", **env) as app:
            results = asyncio.run(run(app["main-app"].url, args.turns, args.rounds))
    for name, values in results.items():
        say(f"  {name:28s} {len(values)} turns: median {median(values):.0f} ms, p95 {pct(values, 0.95):.0f} ms")


if __name__ == "__main__":
    main()
