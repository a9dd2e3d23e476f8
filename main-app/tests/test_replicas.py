"""Two main-app replicas sharing one PostgreSQL (a real throwaway server) in front of the same real
services: a conversation started on one is listed, resumed and deleted on the other, and a replica
killed mid-reply loses nothing that was said."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
from main_app.client import VoiceClient

from devtools.launcher import ServiceProcess

from .conftest import Stack


def ws(app: ServiceProcess) -> str:
    return app.url.replace("http", "ws") + "/ws"


async def text_turn(client: VoiceClient, text: str) -> dict:
    mark = time.monotonic()
    await client.send({"type": "text", "text": text})
    return (await client.wait_for("reply_done", 90, after=mark)).event


async def test_two_replicas_share_conversations_and_a_killed_one_loses_nothing(
    start_service, stack: Stack, postgres_url: str
) -> None:
    env = {f"APP_{n.upper()}_URL": stack.services[n].url for n in ("vad", "stt", "tts", "llm")}
    env |= {"APP_DATABASE_URL": postgres_url, "APP_TEMPERATURE": "0"}
    a = start_service("main-app", STACK="replica-a", **env)
    b = start_service("main-app", STACK="replica-b", **env)
    owner = uuid.uuid4().hex
    mine = {"X-Owner-Token": owner}

    first = VoiceClient(ws(a), owner_token=owner)
    await first.connect(speak=False)
    await text_turn(first, "Remember the word pineapple. Reply with OK.")
    cid = first.conversation_id
    await first.close()

    async with httpx.AsyncClient(timeout=30) as http:  # the other replica lists and reads it; strangers do not
        listed = (await http.get(f"{b.url}/conversations", headers=mine)).json()["conversations"]
        assert cid in [c["id"] for c in listed]
        assert (await http.get(f"{b.url}/conversations/{cid}")).status_code == 404
    resumed = VoiceClient(ws(b), owner_token=owner)
    ready = await resumed.connect(cid, speak=False)
    assert [m["role"] for m in ready["history"]] == ["user", "assistant"]
    await text_turn(resumed, "Thanks.")
    await resumed.close()

    # replica A dies (kill -9) in the middle of a reply: what was asked and what was said so far stay
    doomed = VoiceClient(ws(a), owner_token=owner)
    await doomed.connect(cid, speak=False)
    await doomed.send({"type": "text", "text": "Tell me a long story about a dragon, in at least ten sentences."})
    said = ""
    for _ in range(600):
        said = "".join(e["text"] for e in doomed.of_type("reply_delta"))
        if len(re.findall(r"[.!?]", said)) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(re.findall(r"[.!?]", said)) >= 2, said
    await asyncio.sleep(0.3)
    a.kill()
    await doomed.close()
    async with httpx.AsyncClient(timeout=30) as http:
        stored = (await http.get(f"{b.url}/conversations/{cid}", headers=mine)).json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert stored[-2]["content"].startswith("Tell me a long story")
        partial = stored[-1]
        assert partial["interrupted"] and partial["content"] and partial["content"][:10] in said

        assert (await http.delete(f"{b.url}/conversations/{cid}", headers=mine)).status_code == 200
        a.start().wait_healthy()
        assert (await http.get(f"{a.url}/conversations/{cid}", headers=mine)).status_code == 404
