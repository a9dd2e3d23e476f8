"""Chat history helpers shared by the LLM service and main-app."""

from __future__ import annotations

from .protocol import ChatMessage

MIN_LAST_TOKENS = 64  # a last message is never cut below this


def estimate_tokens(text: str) -> int:
    """Cheap, backend-independent, on the safe side: ~4 characters a token for ASCII text, but up to 2
    tokens for every other character (emoji, CJK: byte-level BPE splits them), so 2,500 emoji are not
    taken for 600 tokens and sent past the model's context."""
    other = sum(1 for c in text if ord(c) > 127)
    return (len(text) - other) // 4 + 2 * other + 4


def fit_text(text: str, budget_tokens: int) -> str:
    """The end of `text` that fits `budget_tokens` (the latest words matter most in a spoken turn)."""
    if estimate_tokens(text) <= budget_tokens:
        return text
    lo, hi = 0, len(text)  # the longest suffix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[-mid:]) <= budget_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[len(text) - lo :]


def trim_history(messages: list[ChatMessage], budget_tokens: int) -> list[ChatMessage]:
    """Drop the oldest turns until the conversation fits; system messages and the last message stay, the
    last one cut to its end when it alone is too long (never below `MIN_LAST_TOKENS`), so an over-long
    message cannot overflow the model's context on this turn or any later one."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    used = sum(estimate_tokens(m.content) for m in system)
    kept: list[ChatMessage] = []
    for i, message in enumerate(reversed(rest)):
        cost = estimate_tokens(message.content)
        if i == 0 and used + cost > budget_tokens:
            message = message.model_copy(
                update={"content": fit_text(message.content, max(MIN_LAST_TOKENS, budget_tokens - used))}
            )
            cost = estimate_tokens(message.content)
        elif i > 0 and used + cost > budget_tokens:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    while len(kept) > 1 and kept[0].role == "assistant":  # a history starts with the user
        kept.pop(0)
    return system + kept
