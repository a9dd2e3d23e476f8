"""Voice-to-voice through OpenAI's Realtime API (`WS /v1/realtime`, the official `openai` client) against
the browser socket (`WS /ws`): end of the user's speech -> first reply audio at the client.

A paired comparison, so that what differs is the socket and nothing else: each question is asked twice,
once on each socket, each time in a new conversation (the same prompt), with the LLM's temperature at 0
(the same reply, so the same text to synthesise), the order alternating from pair to pair (so neither
side is always the one that finds the machine warm). It reports each socket's median and p95 and the
median of the per-pair differences with a bootstrap 95 % interval.

    python scripts/bench_realtime.py [--turns 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from _bench import median, pct, say, services
from bench_voice import one_turn, speech_end_ms
from main_app.client import VoiceClient
from openai import AsyncOpenAI
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import Clip, librivox_clips, silence

FRAME = 480 * 2  # 20 ms of PCM16 at 24 kHz


async def realtime_turn(conn: Any, clip: Clip) -> tuple[float, str]:
    """Stream one question in real time as base64 PCM16 at 24 kHz; ms from the end of its speech to the
    first audio delta of the response, and the response's transcript."""
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
    transcript = ""
    async with asyncio.timeout(120):
        async for event in conn:
            if event.type == "response.output_audio.delta" and first is None and time.monotonic() > end_of_speech:
                first = time.monotonic()
            elif event.type == "response.output_audio_transcript.done" and first is not None:
                transcript = event.transcript
            elif event.type == "response.done" and first is not None:
                break
    await sender
    assert first is not None
    return (first - end_of_speech) * 1000, transcript


async def browser_turn(ws_url: str, clip: Clip) -> tuple[float, str] | None:
    client = VoiceClient(ws_url)
    await client.connect()
    try:
        row = await one_turn(client, clip)
        done = client.of_type("reply_done")
        return None if row is None else (row["v2v_ms"], done[-1]["text"] if done else "")
    finally:
        await client.close()


async def api_turn(app_url: str, clip: Clip) -> tuple[float, str]:
    client = AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused")
    async with client.realtime.connect(model="voicechat") as conn:
        return await realtime_turn(conn, clip)


async def run(app_url: str, turns: int, rounds: int) -> list[tuple[float, float, bool]]:
    """(browser ms, Realtime ms, same reply) per pair."""
    clips = librivox_clips()
    ws_url = app_url.replace("http", "ws") + "/ws"
    pairs: list[tuple[float, float, bool]] = []
    for k in range(rounds * turns):
        clip = clips[k % turns % len(clips)]
        browser_first = k % 2 == 0
        results: dict[str, tuple[float, str] | None] = {}
        for side in ("browser", "api") if browser_first else ("api", "browser"):
            results[side] = await (browser_turn(ws_url, clip) if side == "browser" else api_turn(app_url, clip))
            await asyncio.sleep(1.0)
        b, a = results["browser"], results["api"]
        if b is None or a is None:
            say(f"  pair {k + 1}: a reply had no audio, skipped")
            continue
        same_reply = b[1].strip() == a[1].strip()
        pairs.append((b[0], a[0], same_reply))
        say(f"  pair {k + 1} ({'browser' if browser_first else 'Realtime'} first): /ws {b[0]:.0f} ms, "
            f"/v1/realtime {a[0]:.0f} ms, same reply: {same_reply}")  # fmt: skip
    return pairs


def bootstrap_median(values: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the median by resampling the pairs."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(n, len(values)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def server_stages(log: Path, offset: int) -> dict[str, list[dict[str, float]]]:
    """main-app's per-turn stage times (its log), by socket and in order: where on the server the difference
    arises. `complete`: the turn model's verdict (1 or 0), when it gave one."""
    path_of: dict[str, str] = {}
    stages: dict[str, list[dict[str, float]]] = {"/ws": [], "/v1/realtime": []}
    with log.open("rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rid, msg = rec.get("request_id"), rec.get("msg", "")
            if m := re.search(r'"WebSocket (/ws|/v1/realtime)\S*" \[accepted\]', msg):
                path_of[rid] = m.group(1)
            elif (m := re.match(r"turn \d+ \(voice[^)]*\) ms after the turn: (\{.*\})$", msg)) and rid in path_of:
                row = ast.literal_eval(m.group(1))
                if p := re.search(r"turn model p=([\d.]+)", msg):
                    row["complete"] = float(float(p.group(1)) >= 0.5)
                stages[path_of[rid]].append(row)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5, help="distinct questions per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    say("Realtime API against the browser socket (all five services; each question on both, new conversations)")
    with services("vad", "stt", "tts", "llm") as procs:
        env = {f"APP_{k.upper()}_URL": p.url for k, p in procs.items()}
        with services("main-app", APP_DATA_DIR="data/bench", APP_TEMPERATURE="0", **env) as app:
            log = app["main-app"].log_path
            assert log is not None
            offset = log.stat().st_size
            pairs = asyncio.run(run(app["main-app"].url, args.turns, args.rounds))
            stages = server_stages(log, offset)
    browser, api = [p[0] for p in pairs], [p[1] for p in pairs]
    diff = np.array([p[1] - p[0] for p in pairs])
    same = np.array([p[2] for p in pairs], dtype=bool)
    for name, values in (("browser socket (/ws)", browser), ("Realtime API (/v1/realtime)", api)):
        say(f"  {name:28s} {len(values)} turns: median {median(values):.0f} ms, p95 {pct(values, 0.95):.0f} ms")
    lo, hi = bootstrap_median(diff)
    say(f"  Realtime - browser, per pair: median {np.median(diff):+.0f} ms (95 % interval {lo:+.0f} .. {hi:+.0f}), "
        f"mean {diff.mean():+.0f} ms; {same.sum()} of {len(pairs)} pairs gave the same reply")  # fmt: skip
    if 0 < same.sum() < len(pairs):
        say(f"  pairs with the same reply only: median difference {np.median(diff[same]):+.0f} ms")

    # the turn model is unsure on some clips: the same words, resampled from 24 kHz, may fall on the other
    # side of its threshold and wait the long pause (or not) on one socket only; that is not the socket's
    if len(stages["/ws"]) == len(stages["/v1/realtime"]) == len(pairs):
        verdicts = zip(stages["/ws"], stages["/v1/realtime"], strict=True)
        agree = np.array([b.get("complete") == a.get("complete") for b, a in verdicts])
        if agree.any():
            say(f"  pairs where the turn model gave both the same verdict: {agree.sum()} of {len(pairs)}, "
                f"median difference {np.median(diff[agree]):+.0f} ms (95 % interval "
                "{:+.0f} .. {:+.0f})".format(*bootstrap_median(diff[agree])))  # fmt: skip
    parts = []
    for stage in ("stt_final", "llm_first_token", "tts_first_audio", "first_audio_sent"):
        b = median([r[stage] for r in stages["/ws"] if stage in r])
        a = median([r[stage] for r in stages["/v1/realtime"] if stage in r])
        parts.append(f"{stage} {b:.0f} / {a:.0f}")
    say(f"  on main-app (median ms after the end of the turn, /ws / /v1/realtime): {', '.join(parts)}")


if __name__ == "__main__":
    main()
