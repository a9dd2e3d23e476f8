"""STT benchmark: real-time factor per model on the LibriVox clips; for the WebSocket path the time from
`stop` to the final transcript for 2, 5 and 10 s utterances streamed in real time, and the word error
rate of the streamed finals against REST on the same audio."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from _bench import REPO_ROOT, median, say, services
from stt_service.engine import load_transcriber
from stt_service.settings import SttSettings
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import corpus_wer, librivox_clips, silence

MODELS = ("moonshine-base", "whisper-tiny.en", "whisper-base")


def rtf(model: str) -> tuple[float, float, float]:
    engine = load_transcriber(SttSettings(model=model, models_dir=REPO_ROOT / "models"))
    clips = librivox_clips()
    audio = [load_mono(c.data, 16000)[0] for c in clips]
    engine.transcribe(audio[1], language="en")  # warm up
    t0 = time.perf_counter()
    pairs = [(c.text, engine.transcribe(a, language="en").text) for c, a in zip(clips, audio, strict=True)]
    seconds = time.perf_counter() - t0
    duration = sum(len(a) for a in audio) / 16000
    return seconds / duration, duration, corpus_wer(pairs)


def draft_gain(model: str) -> tuple[float, float]:
    """Median ms to decode each clip whole, alone and drafted by a decode of all but its last 0.5 s (the
    interim a live utterance has when it ends; Transcriber.transcribe's `draft`)."""
    engine = load_transcriber(SttSettings(model=model, models_dir=REPO_ROOT / "models"))
    plain, drafted = [], []
    for clip in librivox_clips():
        audio = load_mono(clip.data, 16000)[0]
        interim = engine.transcribe(audio[:-8000], timestamps=False)
        for _ in range(3):
            t0 = time.perf_counter()
            engine.transcribe(audio, timestamps=False)
            t1 = time.perf_counter()
            engine.transcribe(audio, timestamps=False, draft=interim)
            plain.append((t1 - t0) * 1000)
            drafted.append((time.perf_counter() - t1) * 1000)
    return median(plain), median(drafted)


async def stop_to_final(url: str, pcm: bytes) -> tuple[float, str]:
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()

        async def drain() -> tuple[float, str]:
            while True:
                ev = json.loads(await ws.recv())
                if ev["type"] == "final":
                    return time.perf_counter(), str(ev["text"])

        reader = asyncio.create_task(drain())
        t0 = time.perf_counter()
        for i in range(0, len(pcm), 640):  # 20 ms frames in real time, like main-app forwards the mic
            await ws.send(pcm[i : i + 640])
            await asyncio.sleep(max(0.0, t0 + (i + 640) / 32000 - time.perf_counter()))
        stop = time.perf_counter()
        await ws.send(json.dumps({"type": "stop"}))
        at, text = await reader
        return (at - stop) * 1000, text


def streamed_vs_rest(url: str) -> tuple[float, float]:
    """Corpus WER of the five clips streamed in real time (with interims), and of REST on the same audio."""
    import httpx
    from voice_common.audio import encode_wav, pcm16_to_float32

    streamed, rest = [], []
    for clip in librivox_clips():
        pcm = float32_to_pcm16(np.concatenate([load_mono(clip.data, 16000)[0], silence(330)]))
        streamed.append((clip.text, asyncio.run(stop_to_final(url, pcm))[1]))
        wav = encode_wav(pcm16_to_float32(pcm), 16000)
        text = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}, timeout=60).json()["text"]
        rest.append((clip.text, text))
    return corpus_wer(streamed), corpus_wer(rest)


def utterance(seconds: float) -> bytes:
    """Real speech of about `seconds`, then the ~330 ms of silence main-app's VAD hangover adds."""
    speech = np.concatenate([load_mono(c.data, 16000)[0] for c in librivox_clips()])[: int(seconds * 16000)]
    return float32_to_pcm16(np.concatenate([speech, silence(330)]))


def main() -> None:
    say("STT benchmark (Moonshine on onnxruntime; faster-whisper 1.2.1, int8, beam 1; 2 threads)")
    for model in MODELS:
        factor, duration, error = rtf(model)
        say(f"  {model:16s} RTF {factor:.3f} ({duration:.1f} s of LibriVox speech, WER {error:.1%})")
    plain, drafted = draft_gain(MODELS[0])
    say(
        f"  {MODELS[0]} decode of a whole clip: median {plain:.0f} ms; "
        f"drafted by the decode 0.5 s before: {drafted:.0f} ms"
    )
    for model in MODELS[:2]:
        stream_numbers(model)


def stream_numbers(model: str) -> None:
    with services("stt", STT_MODEL=model) as procs:
        url = procs["stt"].url
        say(f"  {model}:")
        for seconds in (2, 5, 10):
            runs = [asyncio.run(stop_to_final(url, utterance(seconds)))[0] for _ in range(3)]
            say(
                f"    WebSocket stop -> final, {seconds:2d} s utterance: median {median(runs):.0f} ms "
                f"(runs: {', '.join(f'{r:.0f}' for r in runs)})"
            )
        streamed, rest = streamed_vs_rest(url)
        say(f"    WER of the five clips: streamed in real time {streamed:.1%}, REST on the same audio {rest:.1%}")


if __name__ == "__main__":
    main()
