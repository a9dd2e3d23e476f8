"""Which llama-server slot a generation goes to (no server needed)."""

from __future__ import annotations

import pytest
from llm_service.backends import SlotAffinity

pytestmark = pytest.mark.fast


def test_a_conversation_returns_to_its_slot() -> None:
    slots = SlotAffinity(4)
    a = slots.acquire("a")
    slots.release(a, "a")
    b = slots.acquire("b")
    slots.release(b, "b")
    assert a != b  # a new conversation takes a slot nobody's prompt is in
    assert slots.acquire("a") == a


def test_a_cancelled_speculation_of_the_same_conversation_does_not_send_the_real_reply_elsewhere() -> None:
    slots = SlotAffinity(4)
    speculative = slots.acquire("a")  # still finishing its cancel on the server
    assert slots.acquire("a") == speculative


def test_a_slot_busy_with_another_conversation_is_not_waited_for() -> None:
    slots = SlotAffinity(2)
    a, b = slots.acquire("a"), slots.acquire("b")
    slots.release(a, "a")
    assert slots.acquire("c") == a  # the only free slot: c's prompt replaces a's there
    slots.release(b, "b")
    assert slots.acquire("a") == b  # a's slot is busy with c: a takes the free one


def test_without_free_slots_the_least_recently_used_is_shared() -> None:
    slots = SlotAffinity(2)
    first, second = slots.acquire("a"), slots.acquire("b")
    assert slots.acquire("c") == first  # llama-server queues it on that slot until it frees
    slots.release(first, "a")
    slots.release(first, "c")
    slots.release(second, "b")
    assert all(not keys for keys in slots.busy)


def test_requests_without_a_key_spread_over_free_slots() -> None:
    slots = SlotAffinity(3)
    assert sorted(slots.acquire(None) for _ in range(3)) == [0, 1, 2]
