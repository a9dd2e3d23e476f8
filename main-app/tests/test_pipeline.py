"""main-app end to end with all five real services: voice turns, barge-in, text, conversations."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from main_app.client import VoiceClient
from voice_common.audio import encode_wav, float32_to_pcm16, pcm16_to_float32

from tests.helpers import librivox_clips, normalize, silence, wer

CLIPS = librivox_clips()
QUIET = float32_to_pcm16(silence(500))
TAIL = float32_to_pcm16(silence(1500))


async def conversation(url: str, cid: str) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{url}/conversations/{cid}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_voice_turn_end_to_end(stack) -> None:
    clip = CLIPS[4]
    client = VoiceClient(stack.ws)
    await client.connect()
    try:
        await client.stream(QUIET + clip.pcm16() + TAIL)
        await client.wait_for("speech_started", 10)
        stopped = await client.wait_for("speech_stopped", 10)
        assert 3000 < stopped.event["t_ms"] < 4500
        final = await client.wait_for("transcript", 20, final=True)
        assert wer(clip.text, final.event["text"]) < 0.2, final.event
        done = await client.wait_for("reply_done", 60)
        metrics = await client.wait_for("metrics", 10)
    finally:
        await client.close()
    turn = done.event["turn"]
    reply = done.event["text"]
    assert reply and not done.event["interrupted"]
    assert "".join(e["text"] for e in client.of_type("reply_delta")).strip() == reply
    assert client.of_type("audio_start")[0] == {
        "type": "audio_start",
        "turn": turn,
        "format": {"rate": 22050, "width": 2, "channels": 1},
    }
    audio = bytes(client.audio[turn])
    assert len(audio) / 2 / 22050 > 0.5
    m = metrics.event
    assert m["stt_final_ms"] > 0 and m["first_audio_sent_ms"] > m["stt_final_ms"], m
    # a speculative reply may have had its first token and audio before the turn ended (negative ms)
    assert m["llm_first_token_ms"] < m["tts_first_audio_ms"] <= m["first_audio_sent_ms"], m
    assert m["turn_inference_ms"] > 0 and 0 <= m["turn_probability"] <= 1, m
    # the reply audio says the reply text
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"{stack.services['stt'].url}/transcribe",
            files={"file": ("r.wav", encode_wav(pcm16_to_float32(audio), 22050))},
        )
    assert wer(reply, r.json()["text"]) < 0.35, (reply, r.json()["text"])
    # and the conversation is stored
    stored = await conversation(stack.app.url, client.conversation_id or "")
    assert [(m["role"], m["source"]) for m in stored["messages"]] == [("user", "voice"), ("assistant", "voice")]
    assert stored["messages"][0]["content"] == final.event["text"]
    assert stored["messages"][1]["content"] == reply
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{stack.app.url}/metrics")).text
    assert 'voice_turn_stage_seconds_count{source="voice",stage="first_audio_sent"}' in text


async def test_barge_in_stops_reply_and_keeps_what_was_heard(stack) -> None:
    client = VoiceClient(stack.ws)
    await client.connect()
    try:
        await client.send(
            {
                "type": "text",
                "text": "Tell me a long story about a brave knight and a dragon. Use at least eight sentences.",
            }
        )
        start = await client.wait_for("audio_start", 60)
        turn = start.event["turn"]
        await asyncio.sleep(2.0)  # let the user hear about two seconds
        await client.stream(QUIET + CLIPS[1].pcm16() + TAIL)
        interrupted = await client.wait_for("interrupted", 10, turn=turn)
        done = await client.wait_for("reply_done", 10, turn=turn)
        assert done.event["interrupted"] is True
        bytes_at_interrupt = len(client.audio[turn])
        await client.wait_for("reply_done", 60, turn=turn + 1)  # the new utterance gets its own reply
        assert len(client.audio[turn]) == bytes_at_interrupt  # no stale audio after the interruption
        speech_started = client.of_type("speech_started")[0]
        assert speech_started
        heard_at = interrupted.t
        assert heard_at - client.first_audio_at[turn] < 8.0
        sent_text = "".join(e["text"] for e in client.of_type("reply_delta") if e["turn"] == turn)
        await asyncio.sleep(0.5)
    finally:
        await client.close()
    stored = await conversation(stack.app.url, client.conversation_id or "")
    assistant = [m for m in stored["messages"] if m["role"] == "assistant"]
    first = assistant[0]
    assert first["interrupted"] is True
    heard, generated = normalize(first["content"]), normalize(sent_text)
    assert 0 < len(heard) < len(generated), (first["content"], sent_text)
    assert heard == generated[: len(heard)]  # a prefix of what was said: the part that was played
    users = [m for m in stored["messages"] if m["role"] == "user"]
    assert users[1]["source"] == "voice" and wer(CLIPS[1].text, users[1]["content"]) < 0.3


async def test_text_fallback_over_websocket(stack) -> None:
    client = VoiceClient(stack.ws)
    await client.connect(speak=False)
    try:
        await client.send({"type": "text", "text": "What is the capital of France? One short sentence."})
        done = await client.wait_for("reply_done", 60)
        assert "paris" in done.event["text"].lower()
        assert not client.of_type("audio_start") and not client.audio
        await client.send({"type": "configure", "speak": True})  # switch spoken replies on mid-session
        await client.send({"type": "text", "text": "And of Italy?"})
        await client.wait_for("reply_done", 60, turn=2)
        assert client.audio.get(2)
    finally:
        await client.close()
    stored = await conversation(stack.app.url, client.conversation_id or "")
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert all(m["source"] == "text" for m in stored["messages"])


async def test_post_chat_json_and_sse(stack) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{stack.app.url}/chat", json={"message": "What is the capital of France?"})
        assert r.status_code == 200, r.text
        cid = r.json()["conversation_id"]
        assert "paris" in r.json()["reply"].lower()
        events = []
        async with http.stream(
            "POST",
            f"{stack.app.url}/chat",
            json={"message": "Repeat the city name.", "conversation_id": cid, "stream": True},
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        parsed = [json.loads(e) for e in events[:-1]]
        assert parsed[0] == {"type": "conversation", "conversation_id": cid}
        assert parsed[-1]["type"] == "done" and parsed[-1]["reply"]
        assert "".join(e["text"] for e in parsed if e["type"] == "token").strip() == parsed[-1]["reply"]
        stored = (await http.get(f"{stack.app.url}/conversations/{cid}")).json()
        assert len(stored["messages"]) == 4
        listing = (await http.get(f"{stack.app.url}/conversations")).json()["conversations"]
        assert any(c["id"] == cid and c["messages"] == 4 for c in listing)
        bad = await http.post(f"{stack.app.url}/chat", json={"message": ""})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        missing = await http.post(f"{stack.app.url}/chat", json={"message": "hi", "conversation_id": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "conversation_not_found"
        assert (await http.delete(f"{stack.app.url}/conversations/{cid}")).status_code == 200
        assert (await http.get(f"{stack.app.url}/conversations/{cid}")).status_code == 404
        assert (await http.delete(f"{stack.app.url}/conversations/{cid}")).status_code == 404


async def test_resume_conversation_voice_and_text_in_one_thread(stack) -> None:
    first = VoiceClient(stack.ws)
    await first.connect(speak=False)
    await first.send({"type": "text", "text": "My name is Ada. Just say hello."})
    await first.wait_for("reply_done", 60)
    await first.close()
    cid = first.conversation_id
    second = VoiceClient(stack.ws)
    ready = await second.connect(conversation_id=cid, speak=False)
    try:
        assert ready["conversation_id"] == cid
        assert ready["history"][0]["content"] == "My name is Ada. Just say hello."
        await second.stream(QUIET + CLIPS[4].pcm16() + TAIL)
        await second.wait_for("reply_done", 60)
    finally:
        await second.close()
    stored = await conversation(stack.app.url, cid or "")
    assert [(m["role"], m["source"]) for m in stored["messages"]] == [
        ("user", "text"),
        ("assistant", "text"),
        ("user", "voice"),
        ("assistant", "voice"),
    ]
    async with websockets.connect(stack.ws) as ws:  # an unknown conversation is a clear error
        await ws.send(json.dumps({"type": "start", "conversation_id": "does-not-exist"}))
        assert json.loads(await ws.recv())["code"] == "conversation_not_found"


async def test_two_sessions_do_not_mix(stack) -> None:
    a, b = VoiceClient(stack.ws), VoiceClient(stack.ws)
    await a.connect(speak=False)
    await b.connect(speak=False)
    try:
        await asyncio.gather(a.stream(QUIET + CLIPS[2].pcm16() + TAIL), b.stream(QUIET + CLIPS[4].pcm16() + TAIL))
        fa = await a.wait_for("transcript", 30, final=True)
        fb = await b.wait_for("transcript", 30, final=True)
        await a.wait_for("reply_done", 90)
        await b.wait_for("reply_done", 90)
    finally:
        await a.close()
        await b.close()
    assert wer(CLIPS[2].text, fa.event["text"]) < 0.2 and wer(CLIPS[4].text, fb.event["text"]) < 0.2
    assert a.conversation_id != b.conversation_id
    sa = await conversation(stack.app.url, a.conversation_id or "")
    sb = await conversation(stack.app.url, b.conversation_id or "")
    assert sa["messages"][0]["content"] == fa.event["text"] and sb["messages"][0]["content"] == fb.event["text"]
    assert len(sa["messages"]) == len(sb["messages"]) == 2


async def test_bad_input_keeps_session_alive(stack) -> None:
    async with websockets.connect(stack.ws) as ws:
        await ws.send(b"\x00\x00")
        assert json.loads(await ws.recv())["code"] == "no_session"
        await ws.send(json.dumps({"type": "start", "format": {"rate": 16000, "width": 3}}))
        assert json.loads(await ws.recv())["code"] == "unsupported_format"
        await ws.send(json.dumps({"type": "start", "speak": False}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(b"\x00")
        assert json.loads(await ws.recv())["code"] == "invalid_audio"
        await ws.send(json.dumps({"type": "dance"}))
        assert json.loads(await ws.recv())["code"] == "bad_event"
        await ws.send(json.dumps({"type": "text", "text": ""}))
        assert json.loads(await ws.recv())["code"] == "bad_event"
        await ws.send(json.dumps({"type": "text", "text": "Say OK."}))
        while (ev := json.loads(await ws.recv()))["type"] != "reply_done":
            pass
        assert ev["text"]


@pytest.mark.parametrize("rate", [48000])
async def test_browser_rate_is_resampled(stack, rate) -> None:
    from voice_common.audio import resample

    clip = CLIPS[4]
    pcm = float32_to_pcm16(resample(pcm16_to_float32(QUIET + clip.pcm16() + TAIL), 16000, rate))
    client = VoiceClient(stack.ws)
    await client.connect(speak=False, rate=rate)
    try:
        await client.stream(pcm, rate=rate)
        final = await client.wait_for("transcript", 30, final=True)
        await client.wait_for("reply_done", 60)
    finally:
        await client.close()
    assert wer(clip.text, final.event["text"]) < 0.2


async def test_browser_going_away_closes_every_downstream_stream(stack) -> None:
    import re

    async def llm_tokens_so_far() -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{stack.services['llm'].url}/metrics")).text
        return float(re.search(r"^llm_backend_tokens (\S+)", text, re.M).group(1))  # type: ignore[union-attr]

    async def open_streams(service: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{stack.services[service].url}/metrics")).text
        match = re.search(r"^websocket_streams (\S+)", text, re.M)
        return float(match.group(1)) if match else 0.0

    client = VoiceClient(stack.ws)
    await client.connect()
    await client.send({"type": "text", "text": "Tell me a very long story about the sea, at least ten sentences."})
    await client.wait_for("reply_delta", 60)
    assert await open_streams("vad") >= 1 and await open_streams("stt") >= 1
    await client.close()  # mid-reply
    await asyncio.sleep(1.0)
    stopped = await llm_tokens_so_far()
    await asyncio.sleep(1.5)
    assert await llm_tokens_so_far() == stopped  # generation stopped with the session
    assert await open_streams("vad") == 0 and await open_streams("stt") == 0


async def test_services_behind_a_key(start_service, tmp_path) -> None:
    """With keys on the services, main-app authenticates in a header (a key in the URL would land in the
    services' access logs) and a whole voice turn works."""
    key = {"VAD_API_KEY": "k3y", "STT_API_KEY": "k3y", "TTS_API_KEY": "k3y", "LLM_API_KEY": "k3y"}
    services = {name: start_service(name, **key) for name in ("vad", "stt", "tts", "llm")}
    env = {f"APP_{name.upper()}_URL": proc.url for name, proc in services.items()}
    app = start_service("main-app", APP_DATA_DIR=str(tmp_path), APP_DOWNSTREAM_API_KEY="k3y", **env)
    client = VoiceClient(app.url.replace("http", "ws") + "/ws")
    await client.connect()
    try:
        await client.stream(QUIET + CLIPS[4].pcm16() + TAIL)
        final = await client.wait_for("transcript", 30, final=True)
        done = await client.wait_for("reply_done", 60)
    finally:
        await client.close()
    assert wer(CLIPS[4].text, final.event["text"]) < 0.2 and done.event["text"]
    assert len(client.audio[done.event["turn"]]) > 0 and not client.of_type("error")
    for name, proc in services.items():
        assert proc.log_path is not None
        assert "k3y" not in proc.log_path.read_text(errors="replace"), f"{name} logged the key"
