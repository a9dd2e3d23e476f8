from __future__ import annotations

import pytest
from voice_common.chat import estimate_tokens, trim_history
from voice_common.protocol import ChatMessage

pytestmark = pytest.mark.fast


def test_trim_history_keeps_system_and_latest() -> None:
    msgs = [ChatMessage(role="system", content="sys")] + [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=f"message {i} " + "x" * 400) for i in range(20)
    ]
    trimmed = trim_history(msgs, 600)
    assert trimmed[0].role == "system" and trimmed[-1] == msgs[-1]
    assert sum(estimate_tokens(m.content) for m in trimmed) <= 600
    assert trimmed[1].role == "user"
    pair = [msgs[0], msgs[-1]]
    assert trim_history(pair, 1) == pair  # the last message always stays
