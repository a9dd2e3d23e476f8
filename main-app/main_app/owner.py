"""Who owns a conversation: the browser that started it.

Loading the page gives the browser a random secret in an HttpOnly cookie; the store keeps only its hash.
Every conversation route and the WebSocket look conversations up by (id, owner), so an id seen elsewhere
(a shared link, a log line) reads, resumes or deletes nothing. API clients may keep a secret of their own
and send it as `X-Owner-Token`; a client that sends none is the anonymous owner ''.
"""

from __future__ import annotations

import hashlib
import secrets

from starlette.requests import HTTPConnection
from starlette.responses import Response

COOKIE = "voicechat_owner"
HEADER = "x-owner-token"
MAX_AGE_S = 400 * 24 * 3600  # browsers cap cookie lifetimes at 400 days


def owner_of(conn: HTTPConnection) -> str:
    """The owner id of a request or WebSocket: the hash of its secret, or '' without one."""
    token = conn.headers.get(HEADER) or conn.cookies.get(COOKIE)
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


def give_owner_cookie(conn: HTTPConnection, response: Response) -> None:
    """On the page: a browser without a secret gets one (it then owns what it starts)."""
    if not conn.cookies.get(COOKIE):
        response.set_cookie(
            COOKIE,
            secrets.token_urlsafe(24),
            max_age=MAX_AGE_S,
            httponly=True,
            samesite="lax",
            secure=conn.url.scheme == "https",
        )
