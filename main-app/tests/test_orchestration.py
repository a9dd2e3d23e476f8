"""Turn-taking, barge-in, echo guard, persistence and service faults, against in-process fakes of the
four services (tests/fakes.py) and the real main-app on a real socket. No model, no subprocess."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from main_app.app import AppContext, create_app
from main_app.client import VoiceClient
from main_app.outbox import Outbox
from main_app.reply import LLM_DOWN_REPLY, Reply, ReplyContext, ReplyState, is_echo
from main_app.services import ServiceError
from main_app.settings import AppSettings
from main_app.store import SqliteStore, Store
from voice_common.protocol import (
    Event,
    Interim,
    SpeechStarted,
    SpeechStopped,
    Stop,
    SttStart,
    TtsText,
    TurnEnd,
)

from tests.helpers import free_port

from .fakes import FakeServices, until

pytestmark = pytest.mark.fast
FRAME = b"\x00\x00" * 320  # 20 ms of 16 kHz PCM16


@dataclass
class Harness:
    fakes: FakeServices
    store: Store
    url: str
    settings: AppSettings

    async def client(self, **kwargs: object) -> VoiceClient:
        client = VoiceClient(self.url)
        await client.connect(**kwargs)  # type: ignore[arg-type]
        await until(lambda: self.fakes.vads and self.fakes.stts, what="the VAD and STT links")
        return client

    async def say(self, client: VoiceClient, text: str, frames: int = 25, eager: str | None = None) -> float:
        """The user says `text`: speech marks from the VAD, audio, and the STT's final on stop; `eager`:
        the STT's eager transcript at the first quiet, before the VAD ends the turn."""
        self.fakes.transcript = text
        vad = self.fakes.vad_stream
        vad.push(SpeechStarted(t_ms=0))
        await until(lambda: any(isinstance(e, SttStart) for e in self.fakes.stts[-1].sent), what="utterance start")
        for _ in range(frames):
            await client.ws.send(FRAME)  # type: ignore[union-attr]
        if eager is not None:
            self.fakes.stts[-1].push(Interim(utterance=1, text=eager, audio_ms=frames * 20, eager=True))
            vad.push(TurnEnd(t_ms=frames * 20 + 64, probability=0.9, complete=True, inference_ms=50))
            await until(lambda: self.fakes.llm_requests, what="the speculative reply")
            await asyncio.sleep(0.1)  # the turn is not over yet: the reply is generated, held back
        vad.push(SpeechStopped(t_ms=frames * 20, duration_ms=frames * 20))
        return time.monotonic()

    async def messages(self, client: VoiceClient) -> list[dict]:
        return await self.store.messages(client.conversation_id or "")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    settings = AppSettings(
        data_dir=tmp_path, output_sample_rate=16000, playback_lead_ms=100, stt_final_timeout_s=1.0, max_streams=3
    )
    fakes = FakeServices()
    store = SqliteStore(settings.db_path)
    port = free_port()
    app = create_app(settings, AppContext(settings, store, fakes))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, what="main-app")
    yield Harness(fakes, store, f"ws://127.0.0.1:{port}/ws", settings)
    server.should_exit = True
    await task


async def test_voice_turn_reaches_the_browser_and_is_stored(harness: Harness) -> None:
    client = await harness.client()
    try:
        await harness.say(client, "what is the weather like")
        final = await client.wait_for("transcript", 3, final=True)
        assert final.event["text"] == "what is the weather like"
        done = await client.wait_for("reply_done", 5)
        metrics = await client.wait_for("metrics", 3)
    finally:
        await client.close()
    assert done.event["text"] == harness.fakes.reply and not done.event["interrupted"]
    assert "".join(e["text"] for e in client.of_type("reply_delta")) == harness.fakes.reply
    assert client.of_type("audio_start")[0]["turn"] == done.event["turn"]
    assert len(client.audio[done.event["turn"]]) > 0
    assert metrics.event["stt_final_ms"] < metrics.event["llm_first_token_ms"] < metrics.event["first_audio_sent_ms"]
    request = harness.fakes.llm_requests[-1]
    assert request.messages[-1].content == "what is the weather like"
    stored = await harness.messages(client)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "what is the weather like"),
        ("assistant", harness.fakes.reply),
    ]


async def test_preroll_sends_the_audio_since_the_vad_start_mark(harness: Harness) -> None:
    client = await harness.client()
    try:
        for _ in range(50):  # one second before the VAD says speech started at 500 ms
            await client.ws.send(FRAME)  # type: ignore[union-attr]
        await until(lambda: len(harness.fakes.vad_stream.audio()) == 50, what="frames at the VAD")
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=500))
        stt = harness.fakes.stts[-1]
        await until(lambda: stt.of(SttStart), what="utterance start")
        await until(lambda: len(stt.audio()) == 25, what="pre-roll")
        await client.ws.send(FRAME)  # type: ignore[union-attr]
        await until(lambda: len(stt.audio()) == 26, what="live frames after the pre-roll")
    finally:
        await client.close()


async def test_stt_final_timeout_is_reported_and_the_session_goes_on(harness: Harness) -> None:
    harness.fakes.final_delay_s = None  # never answers
    client = await harness.client()
    try:
        stopped = await harness.say(client, "lost words")
        err = await client.wait_for("error", 3, service="stt", code="timeout")
        assert err.t - stopped >= harness.settings.stt_final_timeout_s * 0.9
        assert (await client.wait_for("transcript", 1, final=True)).event["text"] == ""
        harness.fakes.final_delay_s = 0.01
        await harness.say(client, "second try")
        await client.wait_for("reply_done", 5)
    finally:
        await client.close()
    assert (await harness.messages(client))[0]["content"] == "second try"


async def test_a_final_without_words_starts_no_turn(harness: Harness) -> None:
    client = await harness.client()
    try:
        await harness.say(client, " ... ")
        await client.wait_for("transcript", 3, final=True)
        await asyncio.sleep(0.2)
    finally:
        await client.close()
    assert not harness.fakes.llm_requests and not client.of_type("reply_delta")


async def test_barge_in_while_generating_stops_the_llm_before_any_audio(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.2
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Tell me a story."})
        await client.wait_for("reply_delta", 3)
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=100))
        done = await client.wait_for("reply_done", 3)
        await asyncio.sleep(0.3)
    finally:
        await client.close()
    assert done.event["interrupted"] and harness.fakes.llm_stopped == 1
    assert not client.of_type("interrupted")  # nothing was played, so nothing to flush
    assert not client.audio
    deltas_after = [r for r in client.events if r.event["type"] == "reply_delta" and r.t > done.t]
    assert not deltas_after


async def test_barge_in_while_speaking_keeps_only_what_was_heard(harness: Harness) -> None:
    harness.fakes.reply = "First sentence is here. Second sentence follows it. Third one ends the reply."
    harness.fakes.ms_per_char = 40.0  # ~1 s of audio a sentence
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Talk to me."})
        start = await client.wait_for("audio_start", 3)
        await asyncio.sleep(1.3)  # into the second sentence
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=100))
        interrupted = await client.wait_for("interrupted", 3)
        done = await client.wait_for("reply_done", 3)
        frames_then = len(client.audio[start.event["turn"]])
        await asyncio.sleep(0.3)
        frames_later = len(client.audio[start.event["turn"]])
    finally:
        await client.close()
    heard = interrupted.event["heard_text"]
    assert heard.startswith("First sentence is here.") and "Third" not in heard
    assert done.event["interrupted"] and harness.fakes.reply.startswith(done.event["text"])
    assert frames_later == frames_then  # no stale audio after the interruption
    assert harness.fakes.ttss[-1].aborted  # the TTS stream was dropped at once
    stored = (await harness.messages(client))[-1]
    assert stored["interrupted"] and harness.fakes.reply.startswith(stored["content"])


async def test_barge_in_during_playout_updates_the_stored_reply(harness: Harness) -> None:
    harness.fakes.reply = "One. Two. Three. Four. Five. Six. Seven. Eight."
    harness.fakes.ms_per_char = 60.0
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Count."})
        # generated, synthesized and sent: the last ~100 ms (the playback lead) are still being played
        done = await client.wait_for("reply_done", 3)
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=100))
        interrupted = await client.wait_for("interrupted", 3, after=done.t)
        await asyncio.sleep(0.2)  # the client's playback report arrives
    finally:
        await client.close()
    stored = (await harness.messages(client))[-1]
    assert stored["interrupted"] and stored["content"] != harness.fakes.reply  # the last word was not heard
    assert harness.fakes.reply.startswith(stored["content"])
    assert interrupted.event["heard_text"].startswith("One.")
    assert len(client.of_type("reply_done")) == 1  # the reply was already done; no second reply_done


async def test_a_playback_report_corrects_what_was_stored(harness: Harness) -> None:
    harness.fakes.reply = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota."
    harness.fakes.ms_per_char = 40.0
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Greek letters."})
        start = await client.wait_for("audio_start", 3)
        await asyncio.sleep(0.9)
        await client.send({"type": "interrupt"})
        await client.wait_for("reply_done", 3)
        # the page says it had played all of the first two sentences
        await client.send({"type": "playback", "turn": start.event["turn"], "played_ms": 1440})
        await until(lambda: True)
        await asyncio.sleep(0.2)
    finally:
        await client.close()
    stored = (await harness.messages(client))[-1]
    assert stored["content"] == "Alpha beta gamma. Delta epsilon zeta."


async def test_a_typed_message_interrupts_the_running_reply(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.1
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "First question."})
        await client.wait_for("reply_delta", 3)
        await client.send({"type": "text", "text": "Second question."})
        second = await client.wait_for("reply_done", 5, turn=2)
    finally:
        await client.close()
    first = client.of_type("reply_done")[0]
    assert first["turn"] == 1 and first["interrupted"]
    assert second.event["text"] == harness.fakes.reply
    roles = [(m["role"], m["content"]) for m in await harness.messages(client)]
    assert roles[0] == ("user", "First question.") and ("user", "Second question.") in roles


async def test_the_assistant_hearing_itself_is_not_a_turn(harness: Harness) -> None:
    harness.fakes.reply = "The capital of France is Paris, a city on the Seine."
    harness.fakes.ms_per_char = 40.0
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Capital of France?"})
        await client.wait_for("audio_start", 3)
        # the mic picks up the reply; the VAD (threshold raised) still fires: barge-in, then an echo
        await harness.say(client, "capital of France is Paris")
        await client.wait_for("transcript", 3, final=True)
        await asyncio.sleep(0.2)
        assert len(harness.fakes.llm_requests) == 1  # no turn for the echo
        await harness.say(client, "thanks, and what about Spain")
        await client.wait_for("reply_done", 5, turn=2)
    finally:
        await client.close()
    assert harness.fakes.llm_requests[-1].messages[-1].content == "thanks, and what about Spain"


async def test_the_vad_threshold_is_raised_while_speaking(harness: Harness) -> None:
    harness.fakes.reply = "Short reply."
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Hi."})
        await client.wait_for("reply_done", 3)
        await until(lambda: harness.fakes.thresholds()[-1] == harness.settings.vad_threshold, what="restored")
    finally:
        await client.close()
    s = harness.settings
    assert harness.fakes.thresholds() == [s.vad_threshold, s.vad_threshold_speaking, s.vad_threshold]


async def test_llm_down_is_said_in_text_and_recovers(harness: Harness) -> None:
    harness.fakes.down.add("llm")
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Hello?"})
        done = await client.wait_for("reply_done", 3)
        assert done.event["text"] == LLM_DOWN_REPLY
        await client.wait_for("service_status", 1, service="llm", status="down")
        harness.fakes.down.clear()
        await client.send({"type": "text", "text": "Hello again?"})
        done = await client.wait_for("reply_done", 3, turn=2)
        await client.wait_for("service_status", 1, service="llm", status="ok")
    finally:
        await client.close()
    assert done.event["text"] == harness.fakes.reply
    contents = [m["content"] for m in await harness.messages(client)]
    assert LLM_DOWN_REPLY not in contents and contents[0] == "Hello?"  # the apology is not history


async def test_an_llm_error_is_reported_with_its_code(harness: Harness) -> None:
    harness.fakes.llm_error = ServiceError("llm", "context_too_long", "the conversation is too long")
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Hello?"})
        err = await client.wait_for("error", 3, service="llm")
        await client.wait_for("reply_done", 3)
    finally:
        await client.close()
    assert err.event["code"] == "context_too_long"
    assert not client.of_type("service_status")


async def test_tts_down_replies_in_text_then_speaks_again(harness: Harness) -> None:
    harness.fakes.down.add("tts")
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "One."})
        first = await client.wait_for("reply_done", 3)
        await client.wait_for("service_status", 1, service="tts", status="down")
        harness.fakes.down.clear()
        await client.send({"type": "text", "text": "Two."})
        second = await client.wait_for("reply_done", 3, turn=2)
    finally:
        await client.close()
    assert first.event["text"] == harness.fakes.reply and first.event["turn"] not in client.audio
    assert client.audio.get(second.event["turn"])


async def test_tts_lost_mid_reply_finishes_in_text(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.05
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Go."})
        await client.wait_for("audio_start", 3)
        harness.fakes.ttss[-1].lose()
        done = await client.wait_for("reply_done", 3)
    finally:
        await client.close()
    assert done.event["text"] == harness.fakes.reply
    assert any(e["service"] == "tts" for e in client.of_type("error"))


async def typed_turn_with_short_tts_timeout(harness: Harness) -> tuple[VoiceClient, dict[str, Any]]:
    """One typed turn with `tts_timeout_s` at 0.3 s; the client (closed) and its reply_done event."""
    harness.settings.tts_timeout_s = 0.3
    client = await harness.client()
    try:
        await client.send({"type": "text", "text": "Go."})
        done = await client.wait_for("reply_done", 5)
    finally:
        await client.close()
    return client, done.event


async def test_a_slow_llm_is_not_taken_for_a_stuck_tts(harness: Harness) -> None:
    """Under load the first token can take longer than the TTS timeout: the TTS owed nothing yet."""
    harness.fakes.first_token_delay_s = 0.8
    client, done = await typed_turn_with_short_tts_timeout(harness)
    assert not client.of_type("error") and not [e for e in client.of_type("service_status") if e["status"] == "down"]
    assert len(client.audio[done["turn"]]) > 0


async def test_a_tts_that_never_answers_is_reported_and_the_reply_goes_on_in_text(harness: Harness) -> None:
    harness.fakes.tts_mute = True
    client, done = await typed_turn_with_short_tts_timeout(harness)
    assert done["text"] == harness.fakes.reply
    down = [e for e in client.of_type("service_status") if e["status"] == "down"]
    assert down and down[0]["service"] == "tts", client.events


async def test_an_unknown_voice_is_one_error_and_a_text_reply(harness: Harness) -> None:
    harness.fakes.tts_error = ServiceError("tts", "unknown_voice", "unknown voice 'nobody'")
    client = await harness.client()
    try:
        await client.send({"type": "configure", "voice": "nobody"})
        await client.send({"type": "text", "text": "Hi."})
        done = await client.wait_for("reply_done", 3)
    finally:
        await client.close()
    errors = client.of_type("error")
    assert [e["code"] for e in errors] == ["unknown_voice"]
    assert done.event["text"] == harness.fakes.reply and not client.audio


async def test_vad_lost_is_reported_and_relinked(harness: Harness) -> None:
    client = await harness.client()
    try:
        harness.fakes.down.add("vad")
        harness.fakes.vad_stream.lose()
        await client.wait_for("service_status", 3, service="vad", status="down")
        await client.send({"type": "text", "text": "Typing still works."})
        await client.wait_for("reply_done", 3)
        harness.fakes.down.clear()
        await client.wait_for("service_status", 5, service="vad", status="ok")
        assert len(harness.fakes.vads) == 2
        await harness.say(client, "and my voice works again")
        await client.wait_for("reply_done", 5, turn=2)
    finally:
        await client.close()


async def test_stt_closing_its_stream_is_reported_and_relinked(harness: Harness) -> None:
    client = await harness.client()
    try:
        harness.fakes.stts[-1].end()
        await client.wait_for("service_status", 3, service="stt", status="down")
        await client.wait_for("service_status", 5, service="stt", status="ok")
        await harness.say(client, "hello again")
        await client.wait_for("reply_done", 5)
    finally:
        await client.close()
    assert len(harness.fakes.stts) == 2


async def test_configure_changes_speech_and_voice_for_the_next_reply(harness: Harness) -> None:
    client = await harness.client()
    try:
        await client.send({"type": "configure", "speak": False})
        await client.send({"type": "text", "text": "Quietly."})
        quiet = await client.wait_for("reply_done", 3)
        await client.send({"type": "configure", "speak": True, "voice": "en_other"})
        await client.send({"type": "text", "text": "Aloud."})
        aloud = await client.wait_for("reply_done", 3, turn=2)
    finally:
        await client.close()
    assert quiet.event["turn"] not in client.audio and client.audio.get(aloud.event["turn"])
    assert [s.voice for s in harness.fakes.tts_starts] == ["en_other"]


async def test_protocol_mistakes_get_errors_and_the_session_goes_on(harness: Harness) -> None:
    client = await harness.client()
    try:
        await client.send({"type": "start"})
        await client.ws.send(b"\x00\x00\x00")  # type: ignore[union-attr]
        await client.send({"type": "no_such_event"})
        await client.send({"type": "text", "text": ""})
        await client.send({"type": "text", "text": "Still here?"})
        await client.wait_for("reply_done", 3)
    finally:
        await client.close()
    codes = [e["code"] for e in client.of_type("error")]
    assert codes == ["already_started", "invalid_audio", "bad_event", "bad_event"]


async def test_audio_before_start_is_refused(harness: Harness) -> None:
    import json

    import websockets

    async with websockets.connect(harness.url) as ws:
        await ws.send(FRAME)
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["code"] == "no_session"
        await ws.send(json.dumps({"type": "text", "text": "hi"}))
        assert json.loads(await ws.recv())["code"] == "no_session"
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"


async def test_the_browser_leaving_stops_the_reply_and_keeps_what_was_heard(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.1
    client = await harness.client()
    await client.send({"type": "text", "text": "A long answer please."})
    await client.wait_for("reply_delta", 3)
    await client.close()
    await until(lambda: harness.fakes.llm_stopped == 1, what="generation stopped")
    await until(lambda: harness.fakes.vad_stream.closed and harness.fakes.stts[-1].closed, what="links closed")
    messages = await harness.messages(client)
    assert messages[0]["content"] == "A long answer please."  # the user's words are never lost


async def test_sessions_beyond_the_limit_are_refused(harness: Harness) -> None:
    import json

    import websockets

    clients = [await harness.client() for _ in range(harness.settings.max_streams)]
    try:
        async with websockets.connect(harness.url) as ws:
            refusal = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1013
        assert refusal["code"] == "too_many_streams" and refusal["fatal"]
    finally:
        for c in clients:
            await c.close()


async def test_a_speculative_reply_goes_out_when_the_final_matches(harness: Harness) -> None:
    client = await harness.client()
    try:
        await harness.say(client, "What is the weather like?", eager="what is the weather like")
        final = await client.wait_for("transcript", 3, final=True)
        done = await client.wait_for("reply_done", 5)
        metrics = await client.wait_for("metrics", 3)
    finally:
        await client.close()
    assert len(harness.fakes.llm_requests) == 1  # the speculative generation was the reply
    assert harness.fakes.llm_requests[0].messages[-1].content == "what is the weather like"
    deltas = [r for r in client.events if r.event["type"] in ("reply_delta", "audio_start")]
    assert deltas and all(r.t >= final.t for r in deltas)  # nothing before the turn was confirmed
    assert done.event["text"] == harness.fakes.reply and client.audio.get(done.event["turn"])
    assert done.event["turn"] == 1 and {e["turn"] for e in client.of_type("reply_delta")} == {1}
    assert metrics.event["speculative"] and metrics.event["llm_first_token_ms"] < 0  # ready before the end
    assert metrics.event["turn_probability"] == 0.9
    stored = [(m["role"], m["content"]) for m in await harness.messages(client)]
    assert stored == [("user", "What is the weather like?"), ("assistant", harness.fakes.reply)]


async def test_a_wrong_speculation_is_dropped_without_a_trace(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.05
    client = await harness.client()
    try:
        await harness.say(client, "what is the weather like in Paris", eager="what is the weather like")
        done = await client.wait_for("reply_done", 5)
        await asyncio.sleep(0.2)
    finally:
        await client.close()
    prompts = [r.messages[-1].content for r in harness.fakes.llm_requests]
    assert prompts == ["what is the weather like", "what is the weather like in Paris"]
    assert harness.fakes.llm_stopped == 1  # the guess was stopped
    assert len(client.of_type("reply_done")) == 1 and len(client.of_type("audio_start")) == 1
    assert "".join(e["text"] for e in client.of_type("reply_delta")) == harness.fakes.reply
    assert not done.event["interrupted"] and done.event["turn"] == 1  # a dropped guess uses no turn number
    stored = [(m["role"], m["content"]) for m in await harness.messages(client)]
    assert stored == [("user", "what is the weather like in Paris"), ("assistant", harness.fakes.reply)]


async def test_no_speculation_while_the_llm_is_busy_with_another_session(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.2
    other = await harness.client()
    client = await harness.client()
    try:
        await other.send({"type": "text", "text": "A long story, please."})
        await other.wait_for("reply_delta", 3)
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=0))
        stt = harness.fakes.stts[-1]
        await until(lambda: stt.of(SttStart), what="utterance start")
        stt.push(Interim(utterance=1, text="what time is it", audio_ms=800, eager=True))
        harness.fakes.vad_stream.push(TurnEnd(t_ms=864, probability=0.9, complete=True, inference_ms=50))
        await asyncio.sleep(0.3)
    finally:
        await client.close()
        await other.close()
    assert [r.messages[-1].content for r in harness.fakes.llm_requests] == ["A long story, please."]


async def test_a_speculation_is_dropped_when_the_user_goes_on(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.05
    client = await harness.client()
    try:
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=0))
        stt = harness.fakes.stts[-1]
        await until(lambda: stt.of(SttStart), what="utterance start")
        stt.push(Interim(utterance=1, text="I would like", audio_ms=800, eager=True))
        await asyncio.sleep(0.1)
        assert not harness.fakes.llm_requests  # a gap between words is no reason to speculate
        harness.fakes.vad_stream.push(TurnEnd(t_ms=864, probability=0.2, complete=False, inference_ms=50))
        await until(lambda: harness.fakes.llm_requests, what="the speculative reply")
        stt.push(Interim(utterance=1, text="I would like a coffee", audio_ms=1600))  # after a pause
        await until(lambda: harness.fakes.llm_stopped == 1, what="the speculation stopped")
    finally:
        await client.close()
    assert not client.of_type("reply_delta") and not client.audio


async def test_the_users_words_are_read_into_the_llm_cache_while_they_speak(harness: Harness) -> None:
    harness.fakes.first_token_delay_s = 0.2
    client = await harness.client()
    try:
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=0))
        stt = harness.fakes.stts[-1]
        await until(lambda: stt.of(SttStart), what="utterance start")
        stt.push(Interim(utterance=1, text="what is the", audio_ms=600))
        await until(lambda: harness.fakes.llm_requests, what="the prefill")
        stt.push(Interim(utterance=1, text="what is the weather", audio_ms=900))  # one at a time: skipped
        await until(lambda: harness.fakes.llm_finished == 1, what="the prefill done")
        stt.push(Interim(utterance=1, text="what is the weather like", audio_ms=1200, eager=True))  # not eager ones
        await asyncio.sleep(0.1)
        assert len(harness.fakes.llm_requests) == 1
        await harness.say(client, "What is the weather like?")
        done = await client.wait_for("reply_done", 5)
    finally:
        await client.close()
    prefill, reply = harness.fakes.llm_requests
    assert prefill.max_tokens == 1 and prefill.messages[-1].content == "what is the"
    assert prefill.prompt_cache_key == reply.prompt_cache_key == client.conversation_id  # the same cache
    assert prefill.priority > reply.priority  # behind any reply someone waits for
    assert reply.messages[-1].content == "What is the weather like?" and reply.max_tokens > 1
    assert "".join(e["text"] for e in client.of_type("reply_delta")) == done.event["text"] == harness.fakes.reply


async def test_no_prefill_while_the_llm_is_busy_with_another_session(harness: Harness) -> None:
    harness.fakes.token_delay_s = 0.2
    other = await harness.client()
    client = await harness.client()
    try:
        await other.send({"type": "text", "text": "A long story, please."})
        await other.wait_for("reply_delta", 3)
        harness.fakes.vad_stream.push(SpeechStarted(t_ms=0))
        stt = harness.fakes.stts[-1]
        await until(lambda: stt.of(SttStart), what="utterance start")
        stt.push(Interim(utterance=1, text="what time is it", audio_ms=800))
        await asyncio.sleep(0.3)
    finally:
        await client.close()
        await other.close()
    assert [r.messages[-1].content for r in harness.fakes.llm_requests] == ["A long story, please."]


# --- the Reply on its own -------------------------------------------------------------------------


def _reply(tmp_path: Path, speak: bool = True) -> Reply:
    sent: list[Event | bytes] = []

    async def record(item: Event | bytes) -> bool:
        sent.append(item)
        return True

    async def changed(_: Reply) -> None:
        pass

    settings = AppSettings(data_dir=tmp_path)
    ctx = ReplyContext(
        FakeServices(), SqliteStore(settings.db_path), Outbox(record, record), settings, "c1", lambda _: None, changed
    )
    return Reply(ctx, 1, "text", time.monotonic(), speak)


def test_heard_is_whole_sentences_then_the_played_fraction(tmp_path: Path) -> None:
    reply = _reply(tmp_path)
    reply.text = ["One two three four. Five six seven eight."]
    reply.audio_started = True
    reply.sentences = [("One two three four.", 0.0, 1000.0), ("Five six seven eight.", 1000.0, 2000.0)]
    reply.played_ms = 999.0
    assert reply.heard() == "One two three"
    reply.played_ms = 1000.0
    assert reply.heard() == "One two three four."
    reply.played_ms = 1500.0
    assert reply.heard() == "One two three four. Five six"
    reply.played_ms = 5000.0
    assert reply.heard() == "One two three four. Five six seven eight."
    silent = _reply(tmp_path, speak=False)
    silent.text = ["Read, not heard."]
    assert silent.heard() == "Read, not heard."  # a text reply is read in full
    assert _reply(tmp_path).heard() == ""  # nothing played yet


def test_echo_is_a_run_of_the_reply_words() -> None:
    reply = "The capital of France is Paris, a city on the Seine."
    assert is_echo("capital of France is Paris", reply)
    assert is_echo("a city on the sane", reply)  # one word misheard
    assert not is_echo("what about Spain then", reply)
    assert not is_echo("Paris", reply)  # too short to tell


async def test_reply_states_run_in_order(tmp_path: Path) -> None:
    reply = _reply(tmp_path)
    states: list[ReplyState] = []

    async def changed(r: Reply) -> None:
        states.append(r.state)

    reply.ctx.on_state = changed
    reply.settings = reply.settings.model_copy(update={"playback_lead_ms": 5000})
    await reply.ctx.store.create(title="t")  # the conversation must exist for history
    reply.ctx.conversation_id = (await reply.ctx.store.list())[0]["id"]
    reply.start(asyncio.create_task)
    assert reply.task is not None
    await asyncio.wait_for(reply.task, 10)
    assert states == [ReplyState.GENERATING, ReplyState.SPEAKING, ReplyState.DONE]
    fakes = reply.ctx.services
    assert isinstance(fakes, FakeServices)
    sent_text = "".join(e.text for e in fakes.ttss[-1].of(TtsText))
    assert sent_text == fakes.reply and fakes.ttss[-1].of(Stop)


async def test_conversations_are_their_owners_only(harness: Harness) -> None:
    """An id seen elsewhere lists, reads, resumes or deletes nothing: conversations belong to the browser
    (owner cookie) or API client (X-Owner-Token) that started them."""
    base = harness.url.replace("ws://", "http://").removesuffix("/ws")
    async with httpx.AsyncClient(base_url=base) as alice, httpx.AsyncClient(base_url=base) as mallory:
        page = await alice.get("/")  # loading the page hands out the owner cookie
        assert "httponly" in page.headers["set-cookie"].lower()
        r = await alice.post("/chat", json={"message": "my secret plan"})
        cid = r.json()["conversation_id"]
        assert [c["id"] for c in (await alice.get("/conversations")).json()["conversations"]] == [cid]
        await mallory.get("/")
        assert mallory.cookies["voicechat_owner"] != alice.cookies["voicechat_owner"]
        assert (await mallory.get("/conversations")).json()["conversations"] == []
        assert (await mallory.get(f"/conversations/{cid}")).status_code == 404
        assert (await mallory.delete(f"/conversations/{cid}")).status_code == 404
        token = alice.cookies["voicechat_owner"]
    stranger = VoiceClient(harness.url)  # no owner secret: the anonymous owner
    with pytest.raises(RuntimeError, match="conversation_not_found"):
        await stranger.connect(conversation_id=cid)
    await stranger.close()
    owner = VoiceClient(harness.url, owner_token=token)
    try:
        ready = await owner.connect(conversation_id=cid)
    finally:
        await owner.close()
    assert ready["history"][0]["content"] == "my secret plan"
