"""Where conversations live: SQLite by default (one file, no set-up), PostgreSQL when
`APP_DATABASE_URL=postgresql://...` is set (several main-app replicas share it). Voice and text turns
are in the same thread.

Every conversation has an owner (a hash of the browser's owner cookie, see `owner.py`); listing,
reading, resuming and deleting only ever see the caller's own. Conversations stored before owners
existed, and those of clients that send no owner, belong to the anonymous owner ''."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncpg

    from .settings import AppSettings

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'text',
    interrupted INTEGER NOT NULL DEFAULT 0, turn INTEGER, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations(owner, updated)"


class Store(Protocol):
    """What main-app needs from a conversation store; both implementations pass the same tests."""

    async def create(self, owner: str = "", title: str = "") -> str: ...

    async def exists(self, cid: str, owner: str = "") -> bool: ...

    async def add(
        self,
        cid: str,
        role: str,
        content: str,
        source: str = "text",
        turn: int | None = None,
        interrupted: bool = False,
    ) -> int:
        """A message, and the conversation's title (its first user words) and update time, at once."""
        ...

    async def update(self, message_id: int, content: str, interrupted: bool) -> None: ...

    async def messages(self, cid: str) -> list[dict[str, Any]]: ...

    async def list(self, owner: str = "", limit: int = 100) -> list[dict[str, Any]]: ...

    async def get(self, cid: str, owner: str = "") -> dict[str, Any] | None: ...

    async def delete(self, cid: str, owner: str = "") -> bool: ...

    async def close(self) -> None: ...


def open_store(settings: AppSettings) -> Store:
    if settings.database_url:
        return PostgresStore(settings.database_url)
    return SqliteStore(settings.db_path)


class SqliteStore:
    """Blocking sqlite3 behind asyncio.to_thread; one connection guarded by a lock (writes are tiny)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(conversations)")}
        if "owner" not in columns:  # a database from before owners: its conversations become anonymous
            self.db.execute("ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self.db.execute(OWNER_INDEX)
        self.lock = threading.Lock()

    async def close(self) -> None:
        self.db.close()

    async def _run(self, sql: str, args: tuple[Any, ...] = (), fetch: bool = False) -> list[sqlite3.Row]:
        def work() -> list[sqlite3.Row]:
            with self.lock, self.db:
                cur = self.db.execute(sql, args)
                return cur.fetchall() if fetch else []

        return await asyncio.to_thread(work)

    async def create(self, owner: str = "", title: str = "") -> str:
        cid = new_id()
        now = time.time()
        await self._run(
            "INSERT INTO conversations (id, title, created, updated, owner) VALUES (?, ?, ?, ?, ?)",
            (cid, title, now, now, owner),
        )
        return cid

    async def exists(self, cid: str, owner: str = "") -> bool:
        rows = await self._run("SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (cid, owner), fetch=True)
        return bool(rows)

    async def add(
        self,
        cid: str,
        role: str,
        content: str,
        source: str = "text",
        turn: int | None = None,
        interrupted: bool = False,
    ) -> int:
        def work() -> int:
            now = time.time()
            with self.lock, self.db:
                cur = self.db.execute(
                    "INSERT INTO messages (conversation_id, role, content, source, interrupted, turn, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (cid, role, content, source, int(interrupted), turn, now),
                )
                self.db.execute(
                    "UPDATE conversations SET updated = ?, title = CASE WHEN title = '' AND ? = 'user'"
                    " THEN substr(?, 1, 60) ELSE title END WHERE id = ?",
                    (now, role, content, cid),
                )
                return int(cur.lastrowid or 0)

        return await asyncio.to_thread(work)

    async def update(self, message_id: int, content: str, interrupted: bool) -> None:
        await self._run(
            "UPDATE messages SET content = ?, interrupted = ? WHERE id = ?", (content, int(interrupted), message_id)
        )

    async def messages(self, cid: str) -> list[dict[str, Any]]:
        rows = await self._run(
            "SELECT id, role, content, source, interrupted, turn, created FROM messages"
            " WHERE conversation_id = ? ORDER BY id",
            (cid,),
            fetch=True,
        )
        return [{**dict(r), "interrupted": bool(r["interrupted"])} for r in rows]

    async def list(self, owner: str = "", limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._run(
            "SELECT c.id, c.title, c.created, c.updated,"
            " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS messages"
            " FROM conversations c WHERE c.owner = ? ORDER BY c.updated DESC LIMIT ?",
            (owner, limit),
            fetch=True,
        )
        return [dict(r) for r in rows]

    async def get(self, cid: str, owner: str = "") -> dict[str, Any] | None:
        rows = await self._run(
            "SELECT id, title, created, updated FROM conversations WHERE id = ? AND owner = ?", (cid, owner), fetch=True
        )
        return dict(rows[0]) if rows else None

    async def delete(self, cid: str, owner: str = "") -> bool:
        existed = await self.exists(cid, owner)
        await self._run("DELETE FROM conversations WHERE id = ? AND owner = ?", (cid, owner))
        return existed


def new_id() -> str:
    return uuid.uuid4().hex[:16]


PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL, owner TEXT NOT NULL DEFAULT '');
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS messages (
    id BIGSERIAL PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'text',
    interrupted BOOLEAN NOT NULL DEFAULT false, turn INTEGER, created DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations(owner, updated DESC);
"""
SCHEMA_LOCK = 4_015_221  # pg_advisory_xact_lock key: replicas that start together migrate one at a time


class PostgresStore:
    """asyncpg with a connection pool, opened on first use in the serving event loop; the schema is
    created or migrated then, under an advisory lock. Every write is one transaction."""

    def __init__(self, url: str, max_connections: int = 10) -> None:
        self.url = url
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    import asyncpg

                    pool = await asyncpg.create_pool(
                        self.url, min_size=1, max_size=self.max_connections, command_timeout=10
                    )
                    async with pool.acquire() as con, con.transaction():
                        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                        await con.execute(PG_SCHEMA)
                    self._pool = pool
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def create(self, owner: str = "", title: str = "") -> str:
        cid, now = new_id(), time.time()
        await (await self.pool()).execute(
            "INSERT INTO conversations (id, title, created, updated, owner) VALUES ($1, $2, $3, $3, $4)",
            cid,
            title,
            now,
            owner,
        )
        return cid

    async def exists(self, cid: str, owner: str = "") -> bool:
        sql = "SELECT 1 FROM conversations WHERE id = $1 AND owner = $2"
        return await (await self.pool()).fetchval(sql, cid, owner) is not None

    async def add(
        self,
        cid: str,
        role: str,
        content: str,
        source: str = "text",
        turn: int | None = None,
        interrupted: bool = False,
    ) -> int:
        now = time.time()
        async with (await self.pool()).acquire() as con, con.transaction():
            message_id = await con.fetchval(
                "INSERT INTO messages (conversation_id, role, content, source, interrupted, turn, created)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                cid,
                role,
                content,
                source,
                interrupted,
                turn,
                now,
            )
            await con.execute(
                "UPDATE conversations SET updated = $1, title = CASE WHEN title = '' AND $2 = 'user'"
                " THEN left($3, 60) ELSE title END WHERE id = $4",
                now,
                role,
                content,
                cid,
            )
        return int(message_id)

    async def update(self, message_id: int, content: str, interrupted: bool) -> None:
        sql = "UPDATE messages SET content = $1, interrupted = $2 WHERE id = $3"
        await (await self.pool()).execute(sql, content, interrupted, message_id)

    async def messages(self, cid: str) -> list[dict[str, Any]]:
        rows = await (await self.pool()).fetch(
            "SELECT id, role, content, source, interrupted, turn, created FROM messages"
            " WHERE conversation_id = $1 ORDER BY id",
            cid,
        )
        return [dict(r) for r in rows]

    async def list(self, owner: str = "", limit: int = 100) -> list[dict[str, Any]]:
        rows = await (await self.pool()).fetch(
            "SELECT c.id, c.title, c.created, c.updated,"
            " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS messages"
            " FROM conversations c WHERE c.owner = $1 ORDER BY c.updated DESC LIMIT $2",
            owner,
            limit,
        )
        return [dict(r) for r in rows]

    async def get(self, cid: str, owner: str = "") -> dict[str, Any] | None:
        row = await (await self.pool()).fetchrow(
            "SELECT id, title, created, updated FROM conversations WHERE id = $1 AND owner = $2", cid, owner
        )
        return dict(row) if row is not None else None

    async def delete(self, cid: str, owner: str = "") -> bool:
        sql = "DELETE FROM conversations WHERE id = $1 AND owner = $2 RETURNING id"
        return await (await self.pool()).fetchval(sql, cid, owner) is not None
