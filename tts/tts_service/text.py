"""Text for speech: clean up LLM output and cut a token stream into speakable sentences.

Shared by the TTS service (which splits what it is sent) and main-app (which tracks what was said).
"""

from __future__ import annotations

import re

ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "approx", "no", "fig",
    "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "mt", "ft", "u.s", "a.m", "p.m",
}  # fmt: skip
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f900-\U0001f9ff\U00002190-\U000021ff\U00002b00-\U00002bff"
    "\ufe0f\u200d]+"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # NUL etc. (espeak chokes)
_MARKDOWN = [
    (re.compile(r"```.*?```", re.S), " "),  # code blocks are not for speaking
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links: keep the text
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),
    (re.compile(r"(?<![\w*])[*_](?!\s)(.+?)(?<!\s)[*_](?![\w*])"), r"\1"),
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),  # headings
    (re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M), ""),  # list markers
    (re.compile(r"^\s*>\s?", re.M), ""),  # quotes
    (re.compile(r"^\s*\|?[-:| ]{3,}\|?\s*$", re.M), ""),  # table rules
    (re.compile(r"https?://\S+"), "a link"),
]


def clean_for_speech(text: str) -> str:
    """Strip markdown, emoji and control characters; keep the words. Idempotent."""
    text = _CONTROL.sub(" ", text)
    for pattern, repl in _MARKDOWN:
        text = pattern.sub(repl, text)
    text = _EMOJI.sub(" ", text)
    text = text.replace("|", ", ").replace("*", "").replace("#", " number ")
    return re.sub(r"\s+([.,!?;:])", r"\1", re.sub(r"[ \t]+", " ", text))


_END = re.compile(r"([.!?…]+)([\"')\]]*)(\s+|$)|\n\s*\n|\n")
_CLAUSE = re.compile(r"[,;:—–]\s")


def _is_sentence_end(buf: str, m: re.Match[str]) -> bool:
    if m.group(1) is None:
        return True  # newline / paragraph break
    punct = m.group(1)
    before = buf[: m.start()]
    if punct == ".":
        word = re.search(r"([\w.]+)$", before)
        token = word.group(1).lower() if word else ""
        if token.rstrip(".") in ABBREVIATIONS or re.fullmatch(r"[a-z]", token):
            return False
        if re.search(r"\d$", before) and re.match(r"\d", buf[m.end(1) :]):
            return False  # 3.14
    return True


_BREAK_BEFORE = {
    "and", "but", "or", "so", "because", "which", "that", "who", "when", "while", "if", "to", "of", "in", "for",
    "with", "about", "on", "at", "from", "by", "as",
}  # fmt: skip


_NO_END = {
    "the", "a", "an", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these", "those",
    "very", "not", "no", "i", "we", "you", "they", "he", "she", "it",
} | _BREAK_BEFORE  # fmt: skip


def _no_end(word: str) -> bool:
    """A piece never stops on "the", "of", "my" ... nor on "Mr." (its name follows)."""
    word = word.strip().lower()
    return word in _NO_END or word.rstrip(".") in ABBREVIATIONS


def _early_cut(buf: str, words: int) -> int | None:
    """Where to end a piece of about `words` words that has no punctuation yet (None: keep waiting). A word
    is whole once whitespace follows it: an LLM's next token (" Dash") ends "John", so a piece is cut when
    the next word begins, not once it is whole ("wood" is one token more)."""
    complete = list(re.finditer(r"\S+\s+", buf))  # words known to be whole (whitespace after them)
    if len(complete) < words:
        return None
    for m in complete[3 : words + 1]:
        if m.group().strip().lower() in _BREAK_BEFORE:
            return m.start()
    end = words - 1
    while _no_end(complete[end].group()):
        end += 1
        if end == len(complete):
            return None
    return complete[end].end()


class SentenceSplitter:
    """Feed text pieces as they arrive; get back speakable sentences as soon as they are complete.

    A sentence end is only trusted once the next character is seen (so "3." + "14" stays "3.14").
    Long sentences are cut at a clause boundary after `max_chars`. With `eager_first`, the very first
    piece of a reply is cut early so audio starts sooner (each token is ~25 ms here, and the first piece
    is on the latency path): at a clause boundary after `first_min_chars`, or else after about
    `first_words` words, before a conjunction or preposition when there is one.
    """

    def __init__(
        self, max_chars: int = 180, eager_first: bool = True, first_min_chars: int = 12, first_words: int = 4
    ) -> None:
        self.buf = ""
        self.first_words = first_words
        self.max_chars = max_chars
        self.eager = eager_first
        self.first_min = first_min_chars
        self.emitted = 0

    def push(self, text: str) -> list[str]:
        self.buf += text
        out: list[str] = []
        while piece := self._next(final=False):
            out.append(piece)
        return out

    def flush(self) -> list[str]:
        out = []
        while piece := self._next(final=True):
            out.append(piece)
        rest = self._emit(self.buf)
        self.buf = ""
        return out + ([rest] if rest else [])

    def _next(self, final: bool) -> str | None:
        for m in _END.finditer(self.buf):
            if m.end() == len(self.buf) and not final and m.group(1) is not None:
                break  # need one more character to be sure
            if _is_sentence_end(self.buf, m):
                piece, self.buf = self.buf[: m.end()], self.buf[m.end() :]
                if cleaned := self._emit(piece):
                    return cleaned
                return self._next(final)
        limit = self.first_min if self.eager and self.emitted == 0 else self.max_chars
        if len(self.buf) >= limit:
            cuts = [m.end() for m in _CLAUSE.finditer(self.buf) if m.end() >= min(limit, self.first_min)]
            if cuts and (self.emitted == 0 or len(self.buf) >= self.max_chars):
                piece, self.buf = self.buf[: cuts[0]], self.buf[cuts[0] :]
                return self._emit(piece) or None
            if len(self.buf) >= self.max_chars * (1 if final else 2):  # no punctuation at all: cut at a space
                cut = self.buf.rfind(" ", 0, self.max_chars) + 1 or self.max_chars
                piece, self.buf = self.buf[:cut], self.buf[cut:]
                return self._emit(piece) or None
        if self.eager and not self.emitted and not final:
            return self.take_words(self.first_words)
        return None

    def take_words(self, words: int) -> str | None:
        """Cut a piece of about `words` words now, before its sentence ends: for a listener who would
        otherwise run out of audio while the rest of the sentence is generated and synthesised."""
        cut = _early_cut(self.buf, words)
        if cut is None:
            return None
        piece, self.buf = self.buf[:cut], self.buf[cut:]
        return self._emit(piece) or None

    def _emit(self, piece: str) -> str:
        cleaned = clean_for_speech(piece).strip()
        if not re.search(r"\w", cleaned):
            return ""
        self.emitted += 1
        return cleaned


def split_sentences(text: str, max_chars: int = 180, eager_first: bool = False) -> list[str]:
    splitter = SentenceSplitter(max_chars=max_chars, eager_first=eager_first)
    return splitter.push(text) + splitter.flush()
