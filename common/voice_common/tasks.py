"""Per-connection task groups: when one task ends, the others are cancelled and awaited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


async def run_until_first_done(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run tasks together; the first to finish (or fail) ends them all. Errors are logged, not raised,
    so one broken connection never takes down anything else."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("connection task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
