"""VAD benchmark: windows per second on one core (so: real-time streams per core), and the latency the
WebSocket path adds (frame sent -> its probability event received)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from _bench import REPO_ROOT, median, pct, say, services
from vad_service.engine import SileroOnnx, StreamState

from tests.helpers import librivox_clips


def engine_speed() -> float:
    engine = SileroOnnx(REPO_ROOT / "models" / "vad" / "silero_vad.onnx", threads=1)
    audio = b"".join(c.pcm16() for c in librivox_clips())
    samples = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768
    samples = samples[: len(samples) // 512 * 512]
    engine.probabilities(StreamState(), samples[: 512 * 50])  # warm up
    t0 = time.perf_counter()
    engine.probabilities(StreamState(), samples)
    return (len(samples) // 512) / (time.perf_counter() - t0)


async def ws_latency(url: str, n: int = 200) -> list[float]:
    import websockets

    pcm = librivox_clips()[0].pcm16()
    out = []
    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start", "probabilities": True}))
        await ws.recv()
        for i in range(n):
            frame = pcm[(i * 1024) % (len(pcm) - 1024) :][:1024]  # exactly one 512-sample window
            t0 = time.perf_counter()
            await ws.send(frame)
            while json.loads(await ws.recv())["type"] != "probability":
                pass
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    say("VAD benchmark (silero-vad 6.2.3, onnxruntime, 1 thread)")
    wps = engine_speed()
    say(f"  engine: {wps:,.0f} windows/s on one core = {wps / 31.25:,.0f} real-time 16 kHz streams per core")
    with services("vad") as procs:
        lat = asyncio.run(ws_latency(procs["vad"].url))
    say(f"  WebSocket added latency per window: median {median(lat):.2f} ms, p95 {pct(lat, 0.95):.2f} ms")


if __name__ == "__main__":
    main()
