"""Soak: N voice sessions of real recorded speech, streamed in real time, for M minutes, against all five
real services. Every 30 s it prints each service's memory (resident set, with its child processes: the
LLM's llama-server) and the turns answered so far; at the end, latency over time and memory drift.

What a long run would expose: memory that grows per turn or per session (caches, histories, queues),
latency that creeps up (a prompt cache that thrashes, a slot that leaks), turns that stop being answered.

    python scripts/soak.py [--sessions 3] [--minutes 10] [--sample-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from _bench import median, pct, say, services
from bench_voice import error_events, one_turn
from main_app.client import VoiceClient

from tests.helpers import librivox_clips, rss_mb


async def talker(url: str, index: int, deadline: float, rows: list[dict[str, float]], errors: list[str]) -> int:
    """One session asking questions until the deadline; the number of turns that got no reply."""
    await asyncio.sleep(index * 1.5)
    clips = librivox_clips()
    client = VoiceClient(url)
    await client.connect()
    unanswered = 0
    turn = 0
    try:
        while time.monotonic() < deadline:
            try:
                row = await one_turn(client, clips[(index * 7 + turn) % len(clips)])
            except TimeoutError:
                unanswered += 1
                row = None
            turn += 1
            if row is None:
                continue
            row["session"] = index
            rows.append(row)
            await asyncio.sleep(1.0)
    finally:
        errors.extend(error_events(client))
        await client.close()
    return unanswered


async def soak(url: str, pids: dict[str, int], sessions: int, minutes: float, sample_s: float) -> None:
    rows: list[dict[str, float]] = []
    errors: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    memory: list[dict[str, float]] = []

    async def sample() -> None:
        while True:
            now = {name: rss_mb(pid) for name, pid in pids.items()}
            memory.append(now)
            recent = [r["v2v_ms"] for r in rows if r["t"] > time.monotonic() - 60]
            say(
                f"  {time.monotonic() - t0:5.0f} s  turns {len(rows):4d}  last minute median "
                f"{median(recent):5.0f} ms  |  " + "  ".join(f"{k} {v:6.0f} MB" for k, v in now.items())
            )
            await asyncio.sleep(sample_s)

    sampler = asyncio.create_task(sample())
    try:
        unanswered = await asyncio.gather(*(talker(url, i, deadline, rows, errors) for i in range(sessions)))
    finally:
        sampler.cancel()
    memory.append({name: rss_mb(pid) for name, pid in pids.items()})

    v2v = [r["v2v_ms"] for r in rows]
    say(f"\n{sessions} sessions for {minutes:g} min: {len(rows)} turns answered, {sum(unanswered)} unanswered")
    say(f"  voice-to-voice median {median(v2v):.0f} ms, p95 {pct(v2v, 0.95):.0f} ms")
    by_time = sorted(rows, key=lambda r: r["t"])
    fifth = max(1, len(by_time) // 5)
    early = median([r["v2v_ms"] for r in by_time[:fifth]])
    late = median([r["v2v_ms"] for r in by_time[-fifth:]])
    say(f"  first fifth of the turns: median {early:.0f} ms; last fifth {late:.0f} ms ({late / early - 1:+.0%})")
    # memory drift: after warm-up (the first sample after the first minute) to the end
    warm = memory[min(len(memory) - 1, max(1, int(60 // sample_s)))]
    say("  memory (MB) at start / after the first minute / end (drift from the first minute):")
    for name in pids:
        start, w, end = memory[0][name], warm[name], memory[-1][name]
        say(f"    {name:9s} {start:7.0f} {w:7.0f} {end:7.0f}  ({end - w:+.0f})")
    say(f"  error events: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--sample-s", type=float, default=30)
    args = parser.parse_args()
    say(f"Soak: {args.sessions} sessions of recorded speech for {args.minutes:g} min (pid {os.getpid()})")
    with services("vad", "stt", "tts", "llm") as procs:
        env = {f"APP_{k.upper()}_URL": p.url for k, p in procs.items()}
        with services("main-app", APP_DATA_DIR="data/soak", **env) as app:
            everything = {**procs, **app}
            pids = {name: p.proc.pid for name, p in everything.items() if p.proc is not None}
            url = app["main-app"].url.replace("http", "ws") + "/ws"
            asyncio.run(soak(url, pids, args.sessions, args.minutes, args.sample_s))


if __name__ == "__main__":
    main()
