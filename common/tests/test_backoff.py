"""The restart delay shared by the launcher, the LLM's llama-server and main-app's service links."""

from __future__ import annotations

import pytest
from voice_common import backoff as module
from voice_common.backoff import Backoff

pytestmark = pytest.mark.fast


def test_doubles_to_the_cap_and_starts_over_after_staying_up(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    b = Backoff(first=1.0, cap=5.0, reset_after_s=60.0)
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.up()
    now[0] += 10  # up, but not for long: a crash loop keeps its delay
    assert b.next() == 5.0
    b.up()
    now[0] += 61
    assert b.next() == 1.0
    eager = Backoff(first=0.5, cap=5.0, reset_after_s=0.0)
    assert [eager.next(), eager.next()] == [0.5, 1.0]
    eager.up()
    assert eager.next() == 0.5  # any time up is enough
