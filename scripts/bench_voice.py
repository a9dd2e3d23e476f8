"""Voice-to-voice benchmark: N concurrent sessions, each streaming real recorded speech in real time as a
browser would, against all five real services with the embedded models.

Voice-to-voice latency = first reply audio frame received by the client - end of the user's speech
(the last loud 20 ms frame of the clip, on the client's clock). The per-stage breakdown comes from
main-app's metrics event, measured from the VAD's end-of-speech mark on main-app's clock.

    python scripts/bench_voice.py [--sessions 1 2 4] [--turns 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from _bench import median, pct, say, services
from main_app.client import VoiceClient
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import librivox_clips, silence

STAGES = ("stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_sent_ms")


def speech_end_ms(samples: np.ndarray) -> float:
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    loud = np.nonzero(np.sqrt((frames**2).mean(axis=1)) > 10 ** (-35 / 20))[0]
    return float((loud[-1] + 1) * 20)


async def session(url: str, turns: int, offset: int, results: list[dict[str, float]]) -> None:
    clips = librivox_clips()
    client = VoiceClient(url)
    await client.connect()
    try:
        for i in range(turns):
            clip = clips[(offset + i) % len(clips)]
            speech, _ = load_mono(clip.data, 16000)
            lead = 400
            pcm = float32_to_pcm16(np.concatenate([silence(lead), speech, silence(2000)]))
            t_start = time.monotonic()
            mark = t_start
            sender = asyncio.create_task(client.stream(pcm))
            end_of_speech = t_start + (lead + speech_end_ms(speech)) / 1000
            done = await client.wait_for("reply_done", 120, after=mark)
            metrics = await client.wait_for("metrics", 10, after=mark)
            await sender
            turn = done.event["turn"]
            first_audio = client.first_audio_at.get(turn)
            if first_audio is None:
                continue
            row = {"v2v_ms": (first_audio - end_of_speech) * 1000}
            row.update({k: metrics.event[k] for k in STAGES if metrics.event.get(k) is not None})
            results.append(row)
            await asyncio.sleep(1.0)  # let the reply play out a little before the next question
    finally:
        await client.close()


def report(n: int, rows: list[dict[str, float]]) -> None:
    v2v = [r["v2v_ms"] for r in rows]
    say(f"  {n} session(s), {len(rows)} turns: voice-to-voice median {median(v2v):.0f} ms, p95 {pct(v2v, 0.95):.0f} ms")
    parts = []
    for stage in STAGES:
        values = [r[stage] for r in rows if stage in r]
        parts.append(f"{stage.removesuffix('_ms')} {median(values):.0f}")
    say(f"      breakdown (median ms after the VAD's end of speech): {', '.join(parts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    say("Voice-to-voice benchmark (all five services, embedded models, this machine)")
    with services("vad", "stt", "tts", "llm") as procs:
        env = {f"APP_{k.upper()}_URL": p.url for k, p in procs.items()}
        with services("main-app", APP_DATA_DIR="data/bench", **env) as app:
            url = app["main-app"].url.replace("http", "ws") + "/ws"
            for n in args.sessions:
                rows: list[dict[str, float]] = []

                async def run(n: int = n, rows: list[dict[str, float]] = rows) -> None:
                    await asyncio.gather(*(session(url, args.turns, i, rows) for i in range(n)))

                asyncio.run(run())
                report(n, rows)


if __name__ == "__main__":
    main()
