"""Both conversation stores behave the same: SQLite (the default) and PostgreSQL (a real throwaway server,
see the root conftest's `postgres_url`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from main_app.store import PostgresStore, SqliteStore, Store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "c.sqlite3")
    else:
        s = PostgresStore(request.getfixturevalue("postgres_url"))
    try:
        yield s
    finally:
        await s.close()


async def test_a_conversation_round_trip_with_owners(store: Store) -> None:
    me, other = f"me-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    cid = await store.create(me)
    assert await store.exists(cid, me) and not await store.exists(cid, other)
    first = await store.add(cid, "user", "What is the weather like in Paris today?", "voice", 1)
    reply = await store.add(cid, "assistant", "It is sunny", "voice", 1, interrupted=True)
    await store.update(reply, "It is sunny and warm.", interrupted=False)
    messages = await store.messages(cid)
    assert [(m["id"], m["role"], m["interrupted"]) for m in messages] == [
        (first, "user", False),
        (reply, "assistant", False),
    ]
    assert messages[1]["content"] == "It is sunny and warm." and messages[0]["source"] == "voice"
    listed = await store.list(me)
    assert [c["id"] for c in listed] == [cid] and listed[0]["messages"] == 2
    assert listed[0]["title"] == "What is the weather like in Paris today?"
    assert await store.list(other) == [] and await store.get(cid, other) is None
    assert (await store.get(cid, me) or {})["id"] == cid
    assert not await store.delete(cid, other) and await store.exists(cid, me)
    assert await store.delete(cid, me) and await store.messages(cid) == [] and await store.get(cid, me) is None


async def test_latest_first_and_many_writers_at_once(store: Store) -> None:
    owner = f"o-{uuid.uuid4().hex}"
    older, newer = await store.create(owner), await store.create(owner)
    await store.add(older, "user", "first")
    await asyncio.sleep(0.01)
    await store.add(newer, "user", "second")
    assert [c["id"] for c in await store.list(owner)] == [newer, older]
    await asyncio.gather(*(store.add(older, "user", f"m{i}") for i in range(40)))  # one pool, many writers
    assert len(await store.messages(older)) == 41


async def test_postgres_schema_is_created_once_by_replicas_starting_together(postgres_url: str) -> None:
    replicas = [PostgresStore(postgres_url) for _ in range(4)]
    try:
        ids = await asyncio.gather(*(r.create("together") for r in replicas))  # each migrates on first use
        for r in replicas:
            assert {c["id"] for c in await r.list("together")} >= set(ids)
    finally:
        await asyncio.gather(*(r.close() for r in replicas))
