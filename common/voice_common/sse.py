"""Server-sent events the same way from every service: JSON `data:` lines, a keep-alive comment every
15 s (so idle proxies do not drop a slow stream), no caching and no proxy buffering (sse-starlette sets
`X-Accel-Buffering: no`), and the stream stopped when the client goes away."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

KEEP_ALIVE_S = 15


def event_stream(events: AsyncIterator[Any], done: bool = True) -> EventSourceResponse:
    """One SSE response from dicts (sent as JSON) or strings; `done` ends it with OpenAI's `[DONE]`."""

    async def frames() -> AsyncIterator[dict[str, str]]:
        async for event in events:
            yield {"data": event if isinstance(event, str) else json.dumps(event)}
        if done:
            yield {"data": "[DONE]"}

    return EventSourceResponse(frames(), ping=KEEP_ALIVE_S, sep="\n", headers={"Cache-Control": "no-cache"})
