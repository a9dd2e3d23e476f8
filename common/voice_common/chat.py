"""Chat history helpers shared by the LLM service and main-app."""

from __future__ import annotations

from .protocol import ChatMessage


def estimate_tokens(text: str) -> int:
    """~4 characters a token for English: cheap, backend-independent, and errs on the safe side."""
    return len(text) // 4 + 4


def trim_history(messages: list[ChatMessage], budget_tokens: int) -> list[ChatMessage]:
    """Drop the oldest turns until the conversation fits; system messages and the last message stay."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    used = sum(estimate_tokens(m.content) for m in system)
    kept: list[ChatMessage] = []
    for i, message in enumerate(reversed(rest)):
        cost = estimate_tokens(message.content)
        if i > 0 and used + cost > budget_tokens:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    while len(kept) > 1 and kept[0].role == "assistant":  # a history starts with the user
        kept.pop(0)
    return system + kept
