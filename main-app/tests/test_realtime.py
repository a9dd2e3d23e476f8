"""main-app's OpenAI Realtime endpoint, driven by the official `openai` client
(`AsyncOpenAI(...).realtime.connect(...)`) against the five real services: real speech appended as base64
PCM16 at 24 kHz in real time."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI
from voice_common.audio import float32_to_pcm16, load_mono

from tests.helpers import librivox_clips, silence, wer

from .conftest import Stack

CLIP = librivox_clips()[4]
FRAME = 480 * 2  # 20 ms at 24 kHz


def speech(lead_ms: int = 300, tail_ms: int = 1500) -> bytes:
    samples, _ = load_mono(CLIP.data, 24000)
    return float32_to_pcm16(np.concatenate([silence(lead_ms, 24000), samples, silence(tail_ms, 24000)]))


async def append_in_real_time(conn: Any, pcm: bytes) -> None:
    t0 = time.monotonic()
    for i in range(0, len(pcm), FRAME):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + FRAME]).decode())
        await asyncio.sleep(max(0.0, t0 + (i + FRAME) / 48000 - time.monotonic()))


async def until(conn: Any, kind: str, seen: list[Any], within: float = 90) -> Any:
    async with asyncio.timeout(within):
        async for event in conn:
            seen.append(event)
            if event.type == kind:
                return event
    raise AssertionError(f"the connection closed before {kind}")


def client(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.app.url}/v1", api_key="unused")


async def transcribe(stack: Stack, pcm24: bytes) -> str:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(pcm24, dtype="<i2"), 24000, format="WAV", subtype="PCM_16")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{stack.services['stt'].url}/transcribe", files={"file": ("r.wav", buf.getvalue())})
    return str(r.json()["text"])


async def test_server_vad_turn_with_audio_reply(stack: Stack) -> None:
    async with client(stack).realtime.connect(model="voicechat") as conn:
        seen: list[Any] = []
        created = await until(conn, "session.created", seen)
        assert created.session.audio.input.format.rate == 24000
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
        await until(conn, "session.updated", seen)
        sender = asyncio.create_task(append_in_real_time(conn, speech()))
        heard = await until(conn, "conversation.item.input_audio_transcription.completed", seen)
        assert wer(CLIP.text, heard.transcript) < 0.25, heard.transcript
        done = await until(conn, "response.done", seen)
        await sender
    kinds = [e.type for e in seen]
    for expected in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "response.created", "response.output_item.added",
                     "response.output_audio.delta", "response.output_audio_transcript.delta",
                     "response.output_audio.done", "response.output_audio_transcript.done"):  # fmt: skip
        assert expected in kinds, (expected, kinds)
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped")
    assert done.response.status == "completed" and done.response.usage.output_tokens > 0
    said = next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript
    audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    assert len(audio) > 24000  # more than half a second of speech
    assert wer(said, await transcribe(stack, audio)) < 0.35  # the audio says the transcript


async def test_text_only_session_with_a_typed_message(stack: Stack) -> None:
    async with client(stack).realtime.connect(model="voicechat") as conn:
        seen: list[Any] = []
        await until(conn, "session.created", seen)
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await until(conn, "session.updated", seen)
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "What is the capital of France?"}],
        }
        await conn.conversation.item.create(item=item)  # type: ignore[arg-type]
        await until(conn, "conversation.item.added", seen)
        await conn.response.create()
        done = await until(conn, "response.done", seen)
    text = next(e for e in seen if e.type == "response.output_text.done").text
    assert "paris" in text.lower() and done.response.status == "completed"
    assert not [e for e in seen if e.type == "response.output_audio.delta"]


async def test_manual_turns_commit_then_response_create(stack: Stack) -> None:
    async with client(stack).realtime.connect(model="voicechat") as conn:
        seen: list[Any] = []
        await until(conn, "session.created", seen)
        await conn.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
        )
        updated = await until(conn, "session.updated", seen)
        assert updated.session.audio.input.turn_detection is None
        await append_in_real_time(conn, speech(tail_ms=100))  # push to talk: no trailing silence
        await conn.input_audio_buffer.commit()
        heard = await until(conn, "conversation.item.input_audio_transcription.completed", seen)
        assert wer(CLIP.text, heard.transcript) < 0.3
        await asyncio.sleep(1.0)
        assert "response.created" not in [e.type for e in seen]  # manual: nothing until response.create
        await conn.response.create()
        done = await until(conn, "response.done", seen)
        assert done.response.status == "completed"


async def test_barge_in_cancels_the_response_and_truncate_keeps_what_was_heard(stack: Stack) -> None:
    async with client(stack).realtime.connect(model="voicechat") as conn:
        seen: list[Any] = []
        created = await until(conn, "session.created", seen)
        item = {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Tell me a long story about a dragon."}]}  # fmt: skip
        await conn.conversation.item.create(item=item)  # type: ignore[arg-type]
        await conn.response.create()
        first_audio = await until(conn, "response.output_audio.delta", seen)
        await asyncio.sleep(1.0)  # the client has played about a second
        sender = asyncio.create_task(append_in_real_time(conn, speech()))  # the user talks over it
        done = await until(conn, "response.done", seen)
        assert done.response.status == "cancelled"
        await conn.conversation.item.truncate(item_id=first_audio.item_id, content_index=0, audio_end_ms=800)
        truncated = await until(conn, "conversation.item.truncated", seen)
        assert truncated.audio_end_ms == 800
        sender.cancel()
    cid = created.session.id.removeprefix("sess_")
    async with httpx.AsyncClient(timeout=30) as http:
        stored = (await http.get(f"{stack.app.url}/conversations/{cid}")).json()["messages"]
    reply = next(m for m in stored if m["role"] == "assistant")
    full = next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript
    assert reply["interrupted"] and reply["content"] and len(reply["content"]) < max(len(full), 1) + 1
    assert len(reply["content"].split()) <= 6, reply  # about 0.8 s of speech was heard, not the whole story


async def test_bad_events_get_api_shaped_errors(stack: Stack) -> None:
    async with client(stack).realtime.connect(model="voicechat") as conn:
        seen: list[Any] = []
        await until(conn, "session.created", seen)
        await conn.send({"type": "input_audio_buffer.append", "audio": "%%% not base64"})
        error = await until(conn, "error", seen)
        assert error.error.code == "invalid_audio" and error.error.type == "invalid_request_error"
        await conn.response.create()  # nothing to answer yet
        error = await until(conn, "error", seen)
        assert error.error.code == "nothing_to_answer"
        await conn.send({"type": "conversation.item.retrieve", "item_id": "x"})  # not supported: said so
        error = await until(conn, "error", seen)
        assert error.error.code == "bad_event" and "conversation.item.retrieve" in error.error.message
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})  # and it goes on
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}
        await conn.conversation.item.create(item=item)  # type: ignore[arg-type]
        await conn.response.create()
        assert (await until(conn, "response.done", seen)).response.status == "completed"


async def test_key_as_bearer_or_browser_subprotocol(start_service, tmp_path) -> None:
    """The SDK sends the key as a Bearer header; a browser cannot, and offers it as a subprotocol."""
    import json

    import websockets
    from websockets.typing import Subprotocol

    app = start_service("main-app", APP_API_KEY="s3cret", APP_DATA_DIR=str(tmp_path))
    url = app.url.replace("http", "ws") + "/v1/realtime?model=voicechat"
    offer = [Subprotocol("realtime"), Subprotocol("openai-insecure-api-key.s3cret")]
    async with websockets.connect(url, subprotocols=offer) as ws:
        assert ws.subprotocol == "realtime" and json.loads(await ws.recv())["type"] == "session.created"
    async with AsyncOpenAI(base_url=f"{app.url}/v1", api_key="s3cret").realtime.connect(model="voicechat") as conn:
        assert (await until(conn, "session.created", [])).type == "session.created"
    wrong = [Subprotocol("realtime"), Subprotocol("openai-insecure-api-key.wrong")]
    async with websockets.connect(url, subprotocols=wrong) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
