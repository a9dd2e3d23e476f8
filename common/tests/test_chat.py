from __future__ import annotations

import itertools

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
    short = [msgs[0], ChatMessage(role="user", content="hello there")]
    assert trim_history(short, 1) == short  # the last message always stays


def test_an_over_long_last_message_is_cut_to_its_end() -> None:
    for text in ("word " * 8000, "\U0001f600" * 2500):  # 40k characters; 2,500 emoji (~4 bytes each)
        msgs = [ChatMessage(role="system", content="sys"), ChatMessage(role="user", content=text + " END")]
        trimmed = trim_history(msgs, 1500)
        assert trimmed[-1].content.endswith(" END") and len(trimmed[-1].content) < len(text)
        assert sum(estimate_tokens(m.content) for m in trimmed) <= 1500


def test_emoji_are_not_taken_for_cheap_tokens() -> None:
    assert estimate_tokens("\U0001f600" * 100) >= 200 > estimate_tokens("a" * 400)


def test_the_kept_history_starts_at_the_same_message_for_many_turns() -> None:
    """So the LLM's prompt cache keeps the conversation: trimming one turn at a time would change the
    prompt's start every turn once a conversation is long, and the backend would re-read all of it."""
    history = [ChatMessage(role="system", content="You are a voice assistant.")]
    starts = []
    for turn in range(80):
        history.append(ChatMessage(role="user", content=f"question {turn} " + "words " * 20))
        trimmed = trim_history(history, 1500)
        assert sum(estimate_tokens(m.content) for m in trimmed) <= 1500 and trimmed[1].role == "user"
        assert trimmed[-1] == history[-1]
        starts.append(trimmed[1].content)
        history.append(ChatMessage(role="assistant", content=f"answer {turn} " + "reply " * 60))
    moves = sum(a != b for a, b in itertools.pairwise(starts))
    assert 2 <= moves <= 80 // 5, moves  # it does trim, in big steps (one turn at a time: ~70 moves)
