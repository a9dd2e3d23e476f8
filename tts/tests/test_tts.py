"""TTS service with the real piper voice; speech is checked by transcribing it back with the STT service."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Literal

import httpx
import openai
import pytest
import soundfile as sf
import websockets

from tests.helpers import corpus_wer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please remind me to call my sister at six tonight.",
    "A good assistant should answer quickly and clearly.",
    "We walked along the river until the sun went down.",
    "There are twelve eggs left in the kitchen.",
]


@pytest.fixture(scope="module")
def tts(start_service):
    return start_service("tts")


@pytest.fixture(scope="module")
def stt(start_service):
    """The multilingual base model judges the round trip: a stricter listener than tiny.en."""
    return start_service("stt", STT_MODEL="whisper-base", STT_LANGUAGE="en")


async def transcribe(stt_url: str, audio: bytes) -> str:
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{stt_url}/transcribe", files={"file": ("a.wav", audio)})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


async def until_done(ws: websockets.ClientConnection) -> tuple[list[str], list[bytes]]:
    """What a synthesis stream sends until `done`: the text of each piece, and the audio frames."""
    pieces, frames = [], []
    while True:
        msg = await ws.recv()
        if isinstance(msg, bytes):
            frames.append(msg)
            continue
        ev = json.loads(msg)
        if ev["type"] == "sentence_start":
            pieces.append(ev["text"])
        if ev["type"] == "done":
            return pieces, frames


async def test_round_trip_wer_under_10_percent(tts, stt) -> None:
    pairs = []
    async with httpx.AsyncClient(timeout=120) as client:
        for text in SENTENCES:
            r = await client.post(f"{tts.url}/synthesize", json={"text": text, "voice": "en_US-joe-medium"})
            assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
            pairs.append((text, await transcribe(stt.url, r.content)))
    assert corpus_wer(pairs) < 0.10, pairs


async def test_seed_contract_and_formats(tts) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(
            f"{tts.url}/synthesize", json={"text": "Hello", "voice": "en_female", "return_format": "wav"}
        )
        assert r.status_code == 200
        info = sf.info(io.BytesIO(r.content))
        assert info.format == "WAV" and info.samplerate == 22050 and info.channels == 1 and info.subtype == "PCM_16"
        assert 0.2 < info.duration < 2.0
        wav_ms = info.duration * 1000

        r = await client.post(
            f"{tts.url}/synthesize", json={"text": "Hello", "return_format": "pcm", "sample_rate": 16000}
        )
        assert r.headers["x-sample-rate"] == "16000" and r.headers["content-type"] == "audio/pcm"
        assert abs(len(r.content) / 2 / 16 - int(r.headers["x-duration-ms"])) < 2
        assert abs(len(r.content) / 2 / 16 - wav_ms) < 0.5 * wav_ms  # piper's duration noise varies per call

        r = await client.post(
            f"{tts.url}/synthesize", json={"text": "Hello", "return_format": "base64", "sample_rate": 24000}
        )
        body = r.json()
        audio = base64.b64decode(body["audio"])
        assert body["sample_rate"] == 24000 and sf.info(io.BytesIO(audio)).samplerate == 24000
        assert abs(sf.info(io.BytesIO(audio)).duration * 1000 - body["duration_ms"]) < 2

        slow = await client.post(f"{tts.url}/synthesize", json={"text": "Hello there my friend", "speed": 0.5})
        fast = await client.post(f"{tts.url}/synthesize", json={"text": "Hello there my friend", "speed": 2.0})
        assert sf.info(io.BytesIO(slow.content)).duration > 1.6 * sf.info(io.BytesIO(fast.content)).duration

        voices = (await client.get(f"{tts.url}/voices")).json()
        assert voices["voices"][0] == {
            "name": "en_US-joe-medium",
            "language": "en_US",
            "sample_rate": 22050,
            "speakers": [],
            "quality": "medium",
        }


async def test_bad_inputs(tts) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        cases = [
            ({"text": ""}, "empty_text"),
            ({"text": "   "}, "empty_text"),
            ({"text": "a" * 5000}, "text_too_long"),
            ({"text": "hi", "voice": "klingon"}, "unknown_voice"),
            ({"text": "hi", "speed": 0}, "invalid_request"),
            ({"text": "hi", "speed": 9}, "invalid_request"),
            ({"text": "hi", "return_format": "exe"}, "invalid_request"),
        ]
        for body, code in cases:
            r = await client.post(f"{tts.url}/synthesize", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
        assert "en_US-joe-medium" in (await client.post(f"{tts.url}/synthesize", json=cases[3][0])).text


def test_openai_client(tts, stt) -> None:
    client = openai.OpenAI(base_url=f"{tts.url}/v1", api_key="unused")
    text = SENTENCES[0]
    formats: list[tuple[Literal["wav", "flac", "mp3", "opus"], str]] = [
        ("wav", "WAV"),
        ("flac", "FLAC"),
        ("mp3", "MP3"),
        ("opus", "OGG"),
    ]
    for fmt, container in formats:
        audio = client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format=fmt).content
        info = sf.info(io.BytesIO(audio))
        assert info.format == container and 2.0 < info.duration < 5.0, (fmt, info)
    pcm = client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm").content
    assert 2.0 < len(pcm) / 2 / 24000 < 5.0  # OpenAI's pcm: 24 kHz 16-bit mono
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=text + " " + SENTENCES[1], response_format="wav", stream_format="sse"
    ) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["speech.audio.done"]
    wav = base64.b64decode(events[0]["audio"])
    assert sf.info(io.BytesIO(wav)).samplerate == 22050
    heard = httpx.post(f"{stt.url}/transcribe", files={"file": ("a.wav", wav)}, timeout=60).json()["text"]
    assert corpus_wer([(text, heard)]) < 0.15
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="", response_format="wav")


async def test_websocket_token_by_token(tts, stt) -> None:
    text = "Sure, Mr. Smith. The total is 3.5 dollars, paid on time! **Thanks** for asking 🙂."
    async with websockets.connect(tts.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start", "voice": "en_US-joe-medium", "sample_rate": 16000}))
        start = json.loads(await ws.recv())
        assert start["type"] == "audio_start" and start["format"] == {"rate": 16000, "width": 2, "channels": 1}
        for token in text.split(" "):
            await ws.send(json.dumps({"type": "text", "text": token + " "}))
        await ws.send(json.dumps({"type": "stop"}))
        sentences, frames = await until_done(ws)
    audio = b"".join(frames)
    assert sentences == ["Sure, Mr. Smith.", "The total is 3.5 dollars, paid on time!", "Thanks for asking."]
    assert len(frames) > 10
    import numpy as np
    from voice_common.audio import encode_wav, pcm16_to_float32

    heard = await transcribe(stt.url, encode_wav(pcm16_to_float32(audio), 16000))
    assert corpus_wer([("Sure mister Smith the total is 3.5 dollars paid on time thanks for asking", heard)]) < 0.3, (
        heard
    )
    assert np.abs(pcm16_to_float32(audio)).max() > 0.3


async def test_websocket_cuts_a_long_sentence_when_the_listener_runs_dry(tts) -> None:
    """Words at an LLM's pace after a short first sentence: once that audio runs low, the next piece is
    cut at a word boundary instead of waiting ~3 s for the end of a long sentence (a gap in the reply)."""
    long = "the long road wound slowly over the green hills and past the old mill " * 3 + "down to the sea."
    words = ["Sure.", *long.split()]
    async with websockets.connect(tts.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()

        async def write() -> None:
            for word in words:
                await ws.send(json.dumps({"type": "text", "text": word + " "}))
                await asyncio.sleep(0.08)
            await ws.send(json.dumps({"type": "stop"}))

        writer = asyncio.create_task(write())
        pieces, _ = await until_done(ws)
        await writer
    assert pieces[0] == "Sure."
    assert len(pieces) >= 3 and not pieces[1].endswith("."), pieces  # cut before the sentence ended
    assert " ".join(pieces).split() == words  # every word once, in order


async def test_websocket_cancel_stops_within_one_chunk(tts) -> None:
    long_text = " ".join(SENTENCES * 3)
    async with websockets.connect(tts.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": long_text}))
        await ws.send(json.dumps({"type": "flush"}))
        while not isinstance(await ws.recv(), bytes):
            pass
        await ws.send(json.dumps({"type": "cancel"}))
        while True:
            msg = await ws.recv()
            if not isinstance(msg, bytes) and json.loads(msg)["type"] == "cancelled":
                break
        after = []
        try:
            while True:
                after.append(await asyncio.wait_for(ws.recv(), 1.5))
        except TimeoutError:
            pass
        assert sum(isinstance(m, bytes) for m in after) <= 1, len(after)
        assert not any(not isinstance(m, bytes) and "sentence_start" in m for m in after)
        # the stream is still usable after a cancel
        await ws.send(json.dumps({"type": "text", "text": "Still here."}))
        await ws.send(json.dumps({"type": "stop"}))
        kinds = []
        while "done" not in kinds:
            msg = await ws.recv()
            kinds.append("audio" if isinstance(msg, bytes) else json.loads(msg)["type"])
        assert "audio" in kinds and kinds[0] == "sentence_start"


async def test_websocket_bad_events(tts) -> None:
    async with websockets.connect(tts.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "text", "text": "hi"}))
        assert json.loads(await ws.recv())["code"] == "no_stream"
        await ws.send(json.dumps({"type": "start", "voice": "klingon"}))
        assert json.loads(await ws.recv())["code"] == "unknown_voice"
        await ws.send(b"\x00\x01")
        assert json.loads(await ws.recv())["code"] == "unexpected_audio"
        await ws.send(json.dumps({"type": "start", "speed": 99}))
        assert json.loads(await ws.recv())["code"] == "bad_event"


async def test_compressed_speech_streams_before_the_text_is_spoken(tts) -> None:
    """mp3, opus, aac and wav are encoded as the sentences are synthesised: the first bytes of a long
    reply arrive long before the last, and the stream is one valid file."""
    import time

    import av

    text = " ".join(SENTENCES * 3)
    for fmt in ("mp3", "opus", "aac", "wav"):
        body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt}
        t0 = time.perf_counter()
        first = None
        data = b""
        async with (
            httpx.AsyncClient(timeout=120) as client,
            client.stream("POST", f"{tts.url}/v1/audio/speech", json=body) as r,
        ):
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                first = first or time.perf_counter() - t0
                data += chunk
        total = time.perf_counter() - t0
        assert first is not None and first < total / 3, (fmt, first, total)
        with av.open(io.BytesIO(data), mode="r") as container:
            seconds = sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))
        assert seconds > 10, (fmt, seconds)
