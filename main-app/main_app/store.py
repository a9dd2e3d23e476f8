"""Conversations in SQLite: one file, voice and text turns in the same thread.

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
from typing import Any

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


class Store:
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

    def close(self) -> None:
        self.db.close()

    async def _run(self, sql: str, args: tuple[Any, ...] = (), fetch: bool = False) -> list[sqlite3.Row]:
        def work() -> list[sqlite3.Row]:
            with self.lock, self.db:
                cur = self.db.execute(sql, args)
                return cur.fetchall() if fetch else []

        return await asyncio.to_thread(work)

    async def create(self, owner: str = "", title: str = "") -> str:
        cid = uuid.uuid4().hex[:16]
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
