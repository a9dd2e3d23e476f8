"""Each downstream service killed mid-session and restarted: the session reports it, keeps working for
what still works, and recovers by itself. This stack has its own processes, so killing them is safe."""

from __future__ import annotations

import httpx
import pytest
from main_app.client import VoiceClient
from main_app.reply import LLM_DOWN_REPLY
from voice_common.audio import float32_to_pcm16

from tests.helpers import librivox_clips, silence, wer

from .conftest import Stack, make_stack

CLIP = librivox_clips()[4]
UTTERANCE = float32_to_pcm16(silence(500)) + CLIP.pcm16() + float32_to_pcm16(silence(1500))


@pytest.fixture(scope="module")
def own_stack(start_service, tmp_path_factory) -> Stack:
    return make_stack(start_service, tmp_path_factory.mktemp("data"), "resilience")


async def health(stack: Stack) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        return dict((await http.get(f"{stack.app.url}/healthz")).json()["downstream"])


async def text_turn(client: VoiceClient, text: str) -> dict:
    import time

    mark = time.monotonic()
    await client.send({"type": "text", "text": text})
    return (await client.wait_for("reply_done", 60, after=mark)).event


async def test_each_service_down_and_back(own_stack: Stack) -> None:
    s = own_stack.services
    client = VoiceClient(own_stack.ws)
    await client.connect()
    try:
        # LLM down: the session says so in text, and recovers when it is back
        s["llm"].kill()
        done = await text_turn(client, "Hello there.")
        assert done["text"] == LLM_DOWN_REPLY
        assert any(e["service"] == "llm" for e in client.of_type("error"))
        assert (await health(own_stack))["llm"]["status"] == "down"
        s["llm"].start().wait_healthy()
        done = await text_turn(client, "What is the capital of France?")
        assert "paris" in done["text"].lower()
        assert {"type": "service_status", "service": "llm", "status": "ok"} in client.of_type("service_status")

        # TTS down: the reply comes as text only; audio again once it is back
        s["tts"].kill()
        done = await text_turn(client, "Say the word blue.")
        assert done["text"] and done["turn"] not in client.audio
        assert any(e["service"] == "tts" for e in client.of_type("error"))
        s["tts"].start().wait_healthy()
        done = await text_turn(client, "Say the word green.")
        assert client.audio.get(done["turn"])

        # STT down mid-session: an error event, typing still works; voice works again after the restart
        s["stt"].kill()
        await client.wait_for("service_status", 10, service="stt", status="down")
        done = await text_turn(client, "Say the word red.")
        assert done["text"] != LLM_DOWN_REPLY
        s["stt"].start().wait_healthy()
        await client.wait_for("service_status", 15, service="stt", status="ok")
        mark = client.events[-1].t
        await client.stream(UTTERANCE)
        final = await client.wait_for("transcript", 30, after=mark, final=True)
        assert wer(CLIP.text, final.event["text"]) < 0.2

        # VAD down mid-session, then back: speech is detected again
        await client.wait_for("reply_done", 60, after=final.t)
        s["vad"].kill()
        await client.wait_for("service_status", 10, service="vad", status="down")
        assert (await health(own_stack))["vad"]["status"] == "down"
        s["vad"].start().wait_healthy()
        await client.wait_for("service_status", 15, service="vad", status="ok")
        mark = client.events[-1].t
        await client.stream(UTTERANCE)
        await client.wait_for("speech_started", 15, after=mark)
        final = await client.wait_for("transcript", 30, after=mark, final=True)
        assert wer(CLIP.text, final.event["text"]) < 0.2
    finally:
        await client.close()
    async with httpx.AsyncClient(timeout=30) as http:
        stored = (await http.get(f"{own_stack.app.url}/conversations/{client.conversation_id}")).json()
    assert sum(m["role"] == "user" for m in stored["messages"]) == 7  # nothing the user said was lost


async def test_stt_that_never_answers_times_out(start_service, stack, tmp_path) -> None:
    """Fault injection (a fake STT that accepts audio and never answers): the session reports a timeout
    and keeps working."""
    import websockets

    async def silent_stt(ws):
        async for _ in ws:
            pass

    async with websockets.serve(silent_stt, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        env = {f"APP_{n.upper()}_URL": stack.services[n].url for n in ("vad", "tts", "llm")}
        app = start_service(
            "main-app",
            APP_STT_URL=f"http://127.0.0.1:{port}",
            APP_STT_FINAL_TIMEOUT_S="1",
            APP_DATA_DIR=str(tmp_path),
            APP_TEMPERATURE="0",
            **env,
        )
        client = VoiceClient(app.url.replace("http", "ws") + "/ws")
        await client.connect(speak=False)
        try:
            await client.stream(UTTERANCE)
            stopped = await client.wait_for("speech_stopped", 10)
            err = await client.wait_for("error", 5, after=stopped.t)
            assert err.event["service"] == "stt" and err.event["code"] == "timeout"
            assert err.t - stopped.t < 3.0
            done = await text_turn(client, "What is the capital of France?")
            assert "paris" in done["text"].lower()
        finally:
            await client.close()
