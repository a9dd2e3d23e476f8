"""The hardening table, run against all five real services of one stack of their own: every bad input
gets a clear 4xx or an error event, never a 5xx; floods get a few errors, not one per frame; a refused
stream is a refusal to main-app, not a flapping link; and no service keeps the memory afterwards.
(Inputs each service's own tests cover in depth are here once more so that the table is in one place.)"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Sequence

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from main_app.client import VoiceClient

from devtools.launcher import ServiceProcess
from tests.helpers import librivox_clips, rss_mb

NAMES = ("vad", "stt", "tts", "llm")
CLIP = librivox_clips()[1]


class Table:
    """The stack under test and each service's memory once warmed up."""

    def __init__(self, procs: dict[str, ServiceProcess]) -> None:
        self.procs = procs
        self.warm: dict[str, float] = {}

    def url(self, name: str) -> str:
        return self.procs[name].url

    def memory(self) -> dict[str, float]:
        return {n: rss_mb(p.proc.pid) for n, p in self.procs.items() if p.proc is not None}


@pytest.fixture(scope="module")
def table(start_service, tmp_path_factory) -> Table:
    procs = {name: start_service(name, STACK="bad-input") for name in NAMES}
    env = {f"APP_{name.upper()}_URL": proc.url for name, proc in procs.items()}
    data = tmp_path_factory.mktemp("bad-input")
    procs["main-app"] = start_service("main-app", APP_DATA_DIR=str(data), STACK="bad-input", **env)
    t = Table(procs)
    asyncio.run(warm_up(t))  # first requests allocate what every later one reuses
    t.warm = t.memory()
    return t


async def warm_up(t: Table) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(2):
            await http.post(f"{t.url('vad')}/detect", files={"file": ("a.wav", CLIP.data)})
            await http.post(f"{t.url('stt')}/transcribe", files={"file": ("a.wav", CLIP.data)})
            await http.post(f"{t.url('tts')}/synthesize", json={"text": "Warming up the voice."})
            await http.post(f"{t.url('main-app')}/chat", json={"message": "Say hello."})


def hour_of_silence() -> bytes:
    buf = io.BytesIO()  # 180 KB that decode to an hour: refused from the header, never decoded
    sf.write(buf, np.zeros(3600 * 8000, dtype=np.float32), 8000, format="FLAC")
    return buf.getvalue()


async def chunked_upload(megabytes: int):
    """A multipart file upload sent without Content-Length: the size limit must hold while reading."""
    yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    for _ in range(megabytes):
        yield b"\0" * (1024 * 1024)


def expect(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.request.url, r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == code, (r.request.url, r.text[:300])


async def test_bad_audio_and_oversized_uploads(table: Table) -> None:
    hour = hour_of_silence()
    async with httpx.AsyncClient(timeout=60) as http:
        for url in (f"{table.url('vad')}/detect", f"{table.url('vad')}/turn", f"{table.url('stt')}/transcribe"):
            expect(await http.post(url, files={"file": ("hour.flac", hour)}), 400, "audio_too_long")
            expect(await http.post(url, files={"file": ("x.wav", b"")}), 400, "invalid_audio")
            expect(await http.post(url, files={"file": ("x.wav", b"\x01\x02garbage" * 50)}), 400, "invalid_audio")
        stt = table.url("stt")
        for path in ("/transcribe", "/v1/audio/transcriptions"):  # a 30 MB chunked upload: 413, not 400
            headers = {"Content-Type": "multipart/form-data; boundary=x"}
            r = await http.post(f"{stt}{path}", content=chunked_upload(30), headers=headers)
            expect(r, 413, "payload_too_large")
        long_prompt = {"prompt": "word " * 2000}
        r = await http.post(f"{stt}/transcribe", files={"file": ("a.wav", CLIP.data)}, data=long_prompt)
        expect(r, 400, "prompt_too_long")
        for temperature in ("inf", "nan", "-1", "7", "warm"):
            r = await http.post(
                f"{stt}/v1/audio/transcriptions",
                files={"file": ("a.wav", CLIP.data)},
                data={"model": "whisper-1", "temperature": temperature},
            )
            expect(r, 400, "invalid_temperature")


async def test_bad_text_and_json(table: Table) -> None:
    tts, llm = table.url("tts"), table.url("llm")
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{tts}/synthesize", json={"text": "Null\x00 bytes\x07 are\x1b not words."})
        assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
        expect(await http.post(f"{tts}/synthesize", json={"text": "\x00\x01\x02"}), 400, "empty_text")
        expect(await http.post(f"{tts}/synthesize", json={"text": "a" * 100_000}), 400, "text_too_long")
        expect(await http.post(f"{tts}/synthesize", json={"text": "hi", "voice": "klingon"}), 400, "unknown_voice")

        huge = {"messages": [{"role": "user", "content": "x" * (20 * 1024 * 1024)}]}
        expect(await http.post(f"{llm}/generate", json=huge), 413, "payload_too_large")
        expect(await http.post(f"{llm}/generate", content=b"{not json"), 400, "invalid_request")
        ask = [{"role": "user", "content": "Hi"}]
        r = await http.post(f"{llm}/v1/chat/completions", json={"model": "gpt-4o", "messages": ask})
        expect(r, 404, "model_not_found")
        expect(await http.post(f"{llm}/generate", json={"messages": ask, "model": "nope"}), 404, "model_not_found")

        for name in ("vad", "stt", "tts", "llm", "main-app"):  # odd header bytes: an ordinary request
            r = await http.get(f"{table.url(name)}/healthz", headers={b"X-Request-ID": b"\xff\xfe-id"})
            assert r.status_code == 200, name
        app = table.url("main-app")
        for cid in ("..%2F..%2Fetc%2Fpasswd", "x' OR '1'='1", "%00"):
            r = await http.get(f"{app}/conversations/{cid}")
            assert r.status_code == 404 and r.json()["error"]["code"] in ("conversation_not_found", "not_found")


async def test_an_over_long_message_does_not_poison_the_conversation(table: Table) -> None:
    app = table.url("main-app")
    async with httpx.AsyncClient(timeout=180) as http:
        r = await http.post(f"{app}/chat", json={"message": "😀" * 2500})  # ~5,000 tokens: past the context
        assert r.status_code == 200, r.text
        cid = r.json()["conversation_id"]
        r = await http.post(f"{app}/chat", json={"message": "What is the capital of France?", "conversation_id": cid})
        assert r.status_code == 200 and "paris" in r.json()["reply"].lower(), r.text


async def flood(url: str, frames: Sequence[str | bytes]) -> list[dict]:
    """Send a flood of bad frames, then wait a moment: the error events that came back."""
    async with websockets.connect(url) as ws:
        for frame in frames:
            await ws.send(frame)
        errors = []
        with pytest.raises(TimeoutError):
            while True:
                errors.append(json.loads(await asyncio.wait_for(ws.recv(), 1.5)))
        return errors


@pytest.mark.parametrize("name", ["vad", "stt", "tts", "llm", "main-app"])
async def test_a_flood_of_bad_frames_gets_a_few_errors(table: Table, name: str) -> None:
    url = table.url(name).replace("http", "ws") + "/ws"
    errors = await flood(url, ["{not json"] * 300 + [json.dumps({"type": "bogus"})] * 300)
    assert 1 <= len(errors) <= 11 and all(e["type"] == "error" for e in errors), errors[-3:]


async def test_stream_refusals_are_refusals_not_flapping(start_service, table: Table, tmp_path) -> None:
    """With STT full, a session says so once, stays down (no up/down flapping), and gets voice input
    as soon as a place is free."""
    stt = start_service("stt", STT_MAX_STREAMS="1", STACK="bad-input-cap")
    env = {f"APP_{n.upper()}_URL": table.url(n) for n in NAMES} | {"APP_STT_URL": stt.url}
    app = start_service("main-app", APP_DATA_DIR=str(tmp_path), STACK="bad-input-cap", **env)
    url = app.url.replace("http", "ws") + "/ws"
    first, second = VoiceClient(url), VoiceClient(url)
    await first.connect()
    try:
        await asyncio.sleep(1.0)  # the first session holds the only STT place
        await second.connect()
        await second.wait_for("service_status", 10, service="stt", status="down")
        await asyncio.sleep(4.0)
        statuses = [e for e in second.of_type("service_status") if e["service"] == "stt"]
        assert statuses == [{"type": "service_status", "service": "stt", "status": "down"}], statuses
        refusal = [e for e in second.of_type("error") if e["service"] == "stt"]
        assert len(refusal) == 1 and re.search(r"limit of 1 streams", refusal[0]["message"]), refusal
        await first.close()
        await second.wait_for("service_status", 15, service="stt", status="ok")
    finally:
        await first.close()
        await second.close()


async def test_no_5xx_and_memory_back_within_100_mb(table: Table) -> None:
    """Runs last: nothing above answered 5xx, every service is alive, and none kept the memory."""
    async with httpx.AsyncClient(timeout=30) as http:
        for name, proc in table.procs.items():
            assert proc.proc is not None and proc.proc.poll() is None, f"{name} died"
            metrics = (await http.get(f"{proc.url}/metrics")).text
            lines = re.findall(r'^http_requests_total\{.*status="5\d\d".*$', metrics, re.M)
            server_errors = [line for line in lines if 'route="/healthz"' not in line]  # 503 while it loaded
            assert not server_errors, (name, server_errors)
    after = table.memory()
    grown = {n: round(after[n] - table.warm[n]) for n in after}
    assert all(g < 100 for g in grown.values()), grown
