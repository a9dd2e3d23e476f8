"""VAD service against the real silero model, over real sockets."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import espeak_wav, librivox_clips, silence

RATE = 16000


def speech_span(samples: np.ndarray) -> tuple[float, float]:
    """Where the speech really is, by energy: first and last 20 ms frame above -35 dBFS
    (the LibriVox recordings' noise floor is at -40 to -55 dBFS)."""
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    level = np.sqrt((frames**2).mean(axis=1))
    loud = np.nonzero(level > 10 ** (-35 / 20))[0]
    return loud[0] * 20.0, (loud[-1] + 1) * 20.0


@pytest.fixture(scope="module")
def vad(start_service):
    return start_service("vad")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Silence, an espeak-ng sentence, silence, a LibriVox clip, silence: with the true speech spans."""
    tmp: Path = tmp_path_factory.mktemp("vad")
    spoken, _ = load_mono(espeak_wav("The weather is lovely today.", tmp / "a.wav").read_bytes(), RATE)
    clip, _ = load_mono(librivox_clips()[1].data, RATE)
    parts = [silence(1000), spoken, silence(1500), clip, silence(800)]
    truth, t = [], 0.0
    for i, part in enumerate(parts):
        if i % 2:
            start, end = speech_span(part)
            truth.append((t + start, t + end))
        t += len(part) * 1000 / RATE
    return np.concatenate(parts), truth


def wav_bytes(samples: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    data = np.repeat(samples[:, None], channels, axis=1) if channels > 1 else samples
    sf.write(buf, data, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def rest_segments(url: str, data: bytes, **form: str) -> dict:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{url}/detect", files={"file": ("a.wav", data)}, data={"min_silence_ms": "600", **form})
    assert r.status_code == 200, r.text
    return r.json()


async def ws_segments(url: str, pcm: bytes, sizes: list[int], rate: int = RATE) -> list[tuple[float, float]]:
    events = []
    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start", "format": {"rate": rate}, "min_silence_ms": 600}))
        assert json.loads(await ws.recv())["type"] == "ready"
        pos, i = 0, 0
        while pos < len(pcm):
            await ws.send(pcm[pos : pos + sizes[i % len(sizes)]])
            pos += sizes[i % len(sizes)]
            i += 1
        await ws.send(json.dumps({"type": "stop"}))
        while (ev := json.loads(await ws.recv()))["type"] != "done":
            events.append(ev)
    starts = [e["t_ms"] for e in events if e["type"] == "speech_started"]
    stops = [e["t_ms"] for e in events if e["type"] == "speech_stopped"]
    assert [e["type"] for e in events] == ["speech_started", "speech_stopped"] * len(starts)
    return list(zip(starts, stops, strict=True))


def assert_near(segments: list[tuple[float, float]], truth: list[tuple[float, float]], tol: float = 150) -> None:
    assert len(segments) == len(truth), (segments, truth)
    for (s, e), (ts, te) in zip(segments, truth, strict=True):
        assert abs(s - ts) <= tol and abs(e - te) <= tol, (segments, truth)


async def test_rest_finds_speech_within_150ms(vad, scene) -> None:
    samples, truth = scene
    body = await rest_segments(vad.url, wav_bytes(samples))
    segments = [(s["start_ms"], s["end_ms"]) for s in body["segments"]]
    assert_near(segments, truth)
    assert body["sample_rate"] == RATE
    assert abs(body["duration_ms"] - len(samples) * 1000 / RATE) < 1
    speech = sum(e - s for s, e in truth) / body["duration_ms"]
    assert abs(body["speech_ratio"] - speech) < 0.05


@pytest.mark.parametrize("sizes", [[640], [666, 1282, 98, 4410, 2]], ids=["20ms", "odd-sized"])
async def test_websocket_matches_rest(vad, scene, sizes) -> None:
    samples, truth = scene
    rest = await rest_segments(vad.url, wav_bytes(samples))
    ws = await ws_segments(vad.url, float32_to_pcm16(samples), sizes)
    assert ws == [(s["start_ms"], s["end_ms"]) for s in rest["segments"]]
    assert_near(ws, truth)


async def test_other_rates_and_stereo(vad, scene) -> None:
    samples, truth = scene
    from voice_common.audio import resample

    body = await rest_segments(vad.url, wav_bytes(resample(samples, RATE, 44100), 44100, channels=2))
    assert body["sample_rate"] == 44100
    assert_near([(s["start_ms"], s["end_ms"]) for s in body["segments"]], truth)
    pcm48 = float32_to_pcm16(resample(samples, RATE, 48000))
    assert_near(await ws_segments(vad.url, pcm48, [1920], rate=48000), truth)


async def test_librivox_clips_are_mostly_speech(vad) -> None:
    for clip in librivox_clips():
        body = await rest_segments(vad.url, clip.data)
        assert body["segments"], clip.path
        assert body["segments"][0]["start_ms"] < 600
        assert body["speech_ratio"] > 0.7


async def test_speaches_timestamps_and_probabilities(vad, scene) -> None:
    samples, truth = scene
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            f"{vad.url}/v1/audio/speech/timestamps",
            files={"file": ("a.wav", wav_bytes(samples))},
            data={"min_silence_duration_ms": "600"},
        )
    assert r.status_code == 200
    assert_near([(s["start"], s["end"]) for s in r.json()], truth)
    async with websockets.connect(vad.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start", "probabilities": True, "threshold": 0.6}))
        await ws.recv()
        await ws.send(float32_to_pcm16(samples[:RATE]))
        probs = [json.loads(await ws.recv()) for _ in range(RATE // 512)]
        assert all(p["type"] == "probability" and 0 <= p["p"] <= 1 for p in probs)
        assert [p["t_ms"] for p in probs[:2]] == [0, 32]


async def test_bad_inputs_get_errors_and_service_keeps_serving(vad, scene) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for data, code in ((b"not audio at all", "invalid_audio"), (b"", "invalid_audio")):
            r = await client.post(f"{vad.url}/detect", files={"file": ("x.wav", data)})
            assert r.status_code == 400 and r.json()["error"]["code"] == code
        r = await client.post(f"{vad.url}/detect", files={"file": ("x.wav", wav_bytes(silence(0)[:0]))})
        assert r.status_code == 400
        r = await client.post(
            f"{vad.url}/detect", files={"file": ("a.wav", wav_bytes(silence(100)))}, data={"threshold": "1.5"}
        )
        assert r.status_code == 400 and "threshold" in r.json()["error"]["message"]
    async with websockets.connect(vad.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(b"\x00\x00" * 320)  # audio before start
        assert json.loads(await ws.recv())["code"] == "no_stream"
        await ws.send("{not json")
        assert json.loads(await ws.recv())["code"] == "bad_event"
        await ws.send(json.dumps({"type": "start", "format": {"rate": 16000, "width": 3}}))
        assert json.loads(await ws.recv())["code"] == "unsupported_format"
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(b"")
        assert json.loads(await ws.recv())["code"] == "invalid_audio"
        await ws.send(b"\x00\x00\x00")
        assert json.loads(await ws.recv())["code"] == "invalid_audio"
        await ws.send(float32_to_pcm16(scene[0]))  # still works after the errors
        await ws.send(json.dumps({"type": "stop"}))
        types = []
        while (ev := json.loads(await ws.recv()))["type"] != "done":
            types.append(ev["type"])
        assert "speech_started" in types
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{vad.url}/healthz")
    assert r.status_code == 200


async def test_many_streams_have_independent_state(vad, scene) -> None:
    import asyncio

    samples, truth = scene
    pcm = float32_to_pcm16(samples)
    results = await asyncio.gather(*(ws_segments(vad.url, pcm, [random.choice([640, 1280, 962])]) for _ in range(4)))
    for segs in results:
        assert_near(segs, truth)


# --- semantic end of turn (smart-turn v3.2) -----------------------------------------------------

TURN_CLIPS = [0, 2, 3]  # read sentences the turn model hears as complete at their end


async def ws_events(url: str, samples: np.ndarray, **start: object) -> list[dict]:
    """Stream 16 kHz audio in 20 ms frames; every event the VAD sends, then its `done`."""
    events = []
    async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready"
        events.append(ready)
        pcm = float32_to_pcm16(samples)
        for i in range(0, len(pcm), 640):
            await ws.send(pcm[i : i + 640])
        await ws.send(json.dumps({"type": "stop"}))
        while (event := json.loads(await ws.recv()))["type"] != "done":
            events.append(event)
    return events


@pytest.mark.parametrize("index", TURN_CLIPS)
async def test_a_pause_mid_sentence_does_not_end_the_turn(vad, index: int) -> None:
    from tests.helpers import with_pause

    speech, _ = load_mono(librivox_clips()[index].data, RATE)
    audio, pause_at = with_pause(speech, 600)
    audio = np.concatenate([silence(300), audio, silence(2000)])
    plain = await ws_events(vad.url, audio, min_silence_ms=300)
    assert sum(e["type"] == "speech_stopped" for e in plain) == 2  # silence alone cuts the user off
    events = await ws_events(vad.url, audio, min_silence_ms=300, turn_detection=True)
    assert events[0]["turn_detection"] is True
    verdicts = [e for e in events if e["type"] == "turn_end"]
    stops = [e for e in events if e["type"] == "speech_stopped"]
    assert len(stops) == 1 and stops[0]["t_ms"] > 300 + pause_at + 600  # one turn, ended after the pause
    at_pause = [v for v in verdicts if 300 + pause_at < v["t_ms"] < 300 + pause_at + 600]
    assert [v["complete"] for v in at_pause] == [False]  # heard as unfinished: the user may go on
    assert verdicts[-1]["complete"] and verdicts[-1]["t_ms"] > stops[0]["t_ms"] - 100  # finished at the end
    assert all(0 < v["inference_ms"] < 2000 for v in verdicts)


async def test_rest_turn_endpoint(vad) -> None:
    from tests.helpers import with_pause

    speech, _ = load_mono(librivox_clips()[3].data, RATE)
    audio, pause_at = with_pause(speech, 600)
    head = audio[: int((pause_at + 200) * RATE / 1000)]
    async with httpx.AsyncClient(timeout=60) as http:
        whole = (await http.post(f"{vad.url}/turn", files={"file": ("a.wav", wav_bytes(speech))})).json()
        half = (await http.post(f"{vad.url}/turn", files={"file": ("a.wav", wav_bytes(head))})).json()
        info = (await http.get(f"{vad.url}/info")).json()
    assert whole["complete"] and whole["probability"] > 0.5 and whole["inference_ms"] > 0
    assert not half["complete"] and half["probability"] < 0.5
    assert info["turn_model"] == "smart-turn-v3.2"


async def test_an_hour_of_silence_is_refused_before_decoding(vad) -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(3600 * 8000, dtype=np.float32), 8000, format="FLAC")
    async with httpx.AsyncClient(timeout=30) as client:
        for path in ("/detect", "/turn"):
            r = await client.post(f"{vad.url}{path}", files={"file": ("hour.flac", buf.getvalue())})
            assert r.status_code == 400 and r.json()["error"]["code"] == "audio_too_long", r.text
