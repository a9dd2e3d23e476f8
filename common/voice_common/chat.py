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
    """Drop the oldest turns until the conversation fits; system messages and the last message stay.

    Old turns go in blocks of about half the budget, each starting at a user message and counted from
    the start of the conversation, so where the kept history begins stays put for many turns: a
    backend's prompt cache (llama.cpp reuses the longest common prefix) then reads only the new turn,
    instead of the whole history again every turn once a conversation is long (seconds on a CPU).
    A last message too long on its own is cut to its end (never below `MIN_LAST_TOKENS`), so an
    over-long message cannot overflow the model's context on this turn or any later one."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    used = sum(estimate_tokens(m.content) for m in system)
    costs = [estimate_tokens(m.content) for m in rest]
    starts, block = [0], 0
    for i, (message, cost) in enumerate(zip(rest, costs, strict=True)):
        if block >= budget_tokens // 2 and message.role == "user":
            starts.append(i)
            block = 0
        block += cost
    for start in starts:
        if used + sum(costs[start:]) <= budget_tokens:
            return system + _from_user(rest[start:])
    return system + _from_user(_fit_from_end(rest, budget_tokens - used))


def _fit_from_end(rest: list[ChatMessage], budget_tokens: int) -> list[ChatMessage]:
    """As many of the latest messages as fit, the last one cut to fit when it alone does not."""
    kept: list[ChatMessage] = []
    used = 0
    for i, message in enumerate(reversed(rest)):
        cost = estimate_tokens(message.content)
        if i == 0 and cost > budget_tokens:
            message = message.model_copy(
                update={"content": fit_text(message.content, max(MIN_LAST_TOKENS, budget_tokens))}
            )
            cost = estimate_tokens(message.content)
        elif i > 0 and used + cost > budget_tokens:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    return kept


def _from_user(kept: list[ChatMessage]) -> list[ChatMessage]:
    """A history starts with the user."""
    while len(kept) > 1 and kept[0].role == "assistant":
        kept = kept[1:]
    return kept
