"""Voice-to-voice benchmark: N concurrent sessions, each streaming real recorded speech in real time as a
browser would, against all five real services with the embedded models.

Voice-to-voice latency = first reply audio frame received by the client - end of the user's speech
(the last loud 20 ms frame of the clip, on the client's clock). The per-stage breakdown comes from
main-app's metrics event, measured from the end of the user's turn on main-app's clock (negative: a
speculative reply was ready before the turn ended). Turns the turn model called complete and unfinished
ones (which wait up to the longer silence cap) are reported apart too. With --pause-ms, a pause is
inserted mid-sentence (at a word gap) and the cut-off rate counts turns answered before the user had
finished.

Sessions start `--stagger-s` apart (real users do not speak in lockstep).

    python scripts/bench_voice.py [--sessions 1 2 4] [--turns 5] [--pause-ms 600] [--stagger-s 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time

import httpx
import numpy as np
from _bench import median, pct, say, services
from main_app.client import VoiceClient
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import Clip, librivox_clips, silence, with_pause

TIMELINE = False  # --per-turn: print what the client saw in each turn
STAGES = ("stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_sent_ms", "turn_inference_ms")


def speech_end_ms(samples: np.ndarray) -> float:
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    loud = np.nonzero(np.sqrt((frames**2).mean(axis=1)) > 10 ** (-35 / 20))[0]
    return float((loud[-1] + 1) * 20)


async def one_turn(client: VoiceClient, clip: Clip, pause_ms: int = 0) -> dict[str, float] | None:
    """Stream one recorded question in real time; its latency row once the reply is done (None: the
    reply had no audio). Raises TimeoutError when no reply comes in 120 s."""
    speech, _ = load_mono(clip.data, 16000)
    if pause_ms:
        speech, _ = with_pause(speech, pause_ms)
    lead = 400
    pcm = float32_to_pcm16(np.concatenate([silence(lead), speech, silence(2000)]))
    t_start = time.monotonic()
    sender = asyncio.create_task(client.stream(pcm))
    try:
        end_of_speech = t_start + (lead + speech_end_ms(speech)) / 1000
        done = await client.wait_for("reply_done", 120, after=end_of_speech, interrupted=False)
        metrics = await client.wait_for("metrics", 10, after=done.t)
        await sender
    finally:
        sender.cancel()
    cut = any(
        r.event["type"] == "transcript" and r.event["final"] and t_start <= r.t < end_of_speech for r in client.events
    )
    first_audio = client.first_audio_at.get(done.event["turn"])
    if first_audio is None:
        return None
    row = {"v2v_ms": (first_audio - end_of_speech) * 1000, "cut": float(cut), "t": end_of_speech}
    row["gaps_ms"] = client.playouts[done.event["turn"]].gaps_ms  # silences inside the reply, as heard
    if TIMELINE:  # what the client saw around the end of speech, ms after it
        seen = [
            f"{r.event['type']}{'(final)' if r.event.get('final') else ''} {(r.t - end_of_speech) * 1000:.0f}"
            for r in client.events
            if end_of_speech - 0.3 <= r.t <= first_audio and r.event["type"] not in ("reply_delta",)
        ]
        say("        " + "; ".join(seen) + f"; first audio {(first_audio - end_of_speech) * 1000:.0f}")
    row["speculative"] = float(bool(metrics.event.get("speculative")))
    if (p := metrics.event.get("turn_probability")) is not None:
        row["turn_p"] = p
    row.update({k: metrics.event[k] for k in STAGES if metrics.event.get(k) is not None})
    return row


def error_events(client: VoiceClient) -> list[str]:
    return [f"{r.event.get('code')}: {r.event.get('message')}" for r in client.events if r.event["type"] == "error"]


async def session(
    url: str,
    turns: int,
    offset: int,
    pause_ms: int,
    results: list[dict[str, float]],
    errors: list[str],
    delay_s: float = 0.0,
) -> None:
    await asyncio.sleep(delay_s)
    clips = librivox_clips()
    client = VoiceClient(url)
    await client.connect()
    try:
        for i in range(turns):
            row = await one_turn(client, clips[(offset + i) % len(clips)], pause_ms)
            if row is not None:
                results.append(row)
            await asyncio.sleep(1.0)  # let the reply play out a little before the next question
    except TimeoutError:
        errors.append("a turn got no reply in 120 s")
    finally:
        errors.extend(error_events(client))
        await client.close()


def report(n: int, turns: int, rows: list[dict[str, float]], speculations: dict[str, float], errors: list[str]) -> None:
    v2v = [r["v2v_ms"] for r in rows]
    say(
        f"  {n} session(s), {len(rows)} of {n * turns} turns answered: voice-to-voice median {median(v2v):.0f} ms, "
        f"p95 {pct(v2v, 0.95):.0f} ms"
    )
    parts = []
    for stage in STAGES:
        values = [r[stage] for r in rows if stage in r]
        parts.append(f"{stage.removesuffix('_ms')} {median(values):.0f}")
    say(f"      breakdown (median ms after the end of the turn): {', '.join(parts)}")
    # the turn model ends a complete-sounding turn at once and lets an unfinished one wait up to the cap:
    # two kinds of turn, each with its own latency (the clips include book fragments that stop mid-sentence)
    threshold = float(os.environ.get("VAD_TURN_THRESHOLD", "0.5"))
    heard = [r for r in rows if "turn_p" in r]
    complete = [r["v2v_ms"] for r in heard if r["turn_p"] >= threshold]
    unfinished = [r["v2v_ms"] for r in heard if r["turn_p"] < threshold]
    if heard:
        say(
            f"      turns the turn model called complete: {len(complete)}, median {median(complete):.0f} ms; "
            f"unfinished (waiting up to the cap): {len(unfinished)}, median {median(unfinished):.0f} ms"
        )
    cut = sum(r["cut"] for r in rows)
    hits = sum(r["speculative"] for r in rows)
    thrown = speculations.get("miss", 0) + speculations.get("dropped", 0)
    say(
        f"      answered before the user had finished: {cut:.0f} of {len(rows)}; speculative replies used "
        f"{hits:.0f} of {len(rows)}, thrown away {thrown:.0f} ({speculations.get('wasted_tokens', 0):.0f} tokens)"
    )
    gaps = [r["gaps_ms"] for r in rows]
    say(
        f"      silences inside a reply (a real-time player waiting for audio): median {median(gaps):.0f} ms, "
        f"p95 {pct(gaps, 0.95):.0f} ms; {sum(g >= 100 for g in gaps)} of {len(gaps)} replies with 100 ms or more"
    )
    say(f"      error events: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    if len(rows) >= 9:  # does it hold up over a long run? (a prompt cache that thrashes would not)
        by_time = sorted(rows, key=lambda r: r["t"])
        third = len(by_time) // 3
        early, late = median([r["v2v_ms"] for r in by_time[:third]]), median([r["v2v_ms"] for r in by_time[-third:]])
        say(
            f"      first third of the turns: median {early:.0f} ms; last third {late:.0f} ms ({late / early - 1:+.0%})"
        )


async def speculation_counts(app_url: str) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{app_url}/metrics")).text
    return {m[0]: float(m[1]) for m in re.findall(r'^voice_speculations_total\{result="(\w+)"\} (\S+)', text, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--pause-ms", type=int, default=0, help="insert a pause mid-sentence (cut-off test)")
    parser.add_argument("--stagger-s", type=float, default=1.5, help="seconds between the sessions' starts")
    parser.add_argument("--per-turn", action="store_true", help="print every turn's row, not only the medians")
    args = parser.parse_args()
    global TIMELINE
    TIMELINE = args.per_turn
    say("Voice-to-voice benchmark (all five services, embedded models, this machine)")
    with services("vad", "stt", "tts", "llm") as procs:
        env = {f"APP_{k.upper()}_URL": p.url for k, p in procs.items()}
        with services("main-app", APP_DATA_DIR="data/bench", **env) as app:
            app_url = app["main-app"].url
            url = app_url.replace("http", "ws") + "/ws"
            for n in args.sessions:
                rows: list[dict[str, float]] = []
                errors: list[str] = []

                async def run(
                    n: int = n, rows: list[dict[str, float]] = rows, errors: list[str] = errors
                ) -> dict[str, float]:
                    before = await speculation_counts(app_url)
                    await asyncio.gather(
                        *(
                            session(url, args.turns, i, args.pause_ms, rows, errors, i * args.stagger_s)
                            for i in range(n)
                        )
                    )
                    after = await speculation_counts(app_url)
                    return {k: v - before.get(k, 0) for k, v in after.items()}

                report(n, args.turns, rows, asyncio.run(run()), errors)
                if args.per_turn:
                    for r in sorted(rows, key=lambda r: r["t"]):
                        cells = [
                            f"{k.removesuffix('_ms')} {v:.{2 if k == 'turn_p' else 0}f}"
                            for k, v in r.items()
                            if k != "t"
                        ]
                        say("      " + ", ".join(cells))


if __name__ == "__main__":
    main()
