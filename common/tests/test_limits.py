"""The scheduling policy shared by the engines: most urgent waiter first, FIFO among equals, bounded queue."""

from __future__ import annotations

import asyncio

import pytest
from voice_common.errors import ApiError
from voice_common.limits import BACKGROUND, URGENT, Limiter

pytestmark = pytest.mark.fast


async def run_order(limiter: Limiter, jobs: list[tuple[str, float]]) -> list[str]:
    """Hold the only slot, queue `jobs` in the given order, then let them run one by one."""
    order: list[str] = []

    async def job(name: str, priority: float) -> None:
        async with limiter.slot(priority):
            order.append(name)
            await asyncio.sleep(0)

    async with limiter.slot():
        tasks = []
        for name, priority in jobs:
            tasks.append(asyncio.create_task(job(name, priority)))
            await asyncio.sleep(0)  # queued in this order
        assert limiter.waiting == len(jobs)
    await asyncio.gather(*tasks)
    return order


async def test_the_most_urgent_waiter_goes_first_and_equals_keep_their_order() -> None:
    order = await run_order(
        Limiter(1, 10),
        [
            ("interim-1", BACKGROUND),
            ("later-sentence-4s-in-hand", 4.0),
            ("final", URGENT),
            ("later-sentence-0.3s-in-hand", 0.3),
            ("interim-2", BACKGROUND),
            ("first-fragment", URGENT),
        ],
    )
    assert order == [
        "final",
        "first-fragment",
        "later-sentence-0.3s-in-hand",
        "later-sentence-4s-in-hand",
        "interim-1",
        "interim-2",
    ]


async def test_a_full_queue_refuses_at_once_and_a_cancelled_waiter_gives_its_place_up() -> None:
    limiter = Limiter(1, 2)
    ran: list[str] = []

    async def job(name: str) -> None:
        async with limiter.slot():
            ran.append(name)

    async with limiter.slot():
        first = asyncio.create_task(job("first"))
        second = asyncio.create_task(job("second"))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as busy:
            async with limiter.slot():
                pass
        assert busy.value.status == 503 and busy.value.code == "busy"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert limiter.waiting == 1
    await second
    assert ran == ["second"] and limiter.active == 0 and limiter.free_now()


async def test_n_slots_run_n_jobs_at_once() -> None:
    limiter = Limiter(2, 10)
    running = 0
    peak = 0

    async def job() -> None:
        nonlocal running, peak
        async with limiter.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(job() for _ in range(6)))
    assert peak == 2 and limiter.active == 0


async def test_a_waiter_cancelled_as_it_is_granted_passes_the_slot_on() -> None:
    limiter = Limiter(1, 10)
    ran: list[str] = []

    async def job(name: str) -> None:
        async with limiter.slot():
            ran.append(name)

    async with limiter.slot():
        doomed = asyncio.create_task(job("doomed"))
        heir = asyncio.create_task(job("heir"))
        await asyncio.sleep(0)
    doomed.cancel()  # the slot was granted to it on release, before it could run
    await asyncio.gather(doomed, heir, return_exceptions=True)
    assert ran == ["heir"] and limiter.active == 0
