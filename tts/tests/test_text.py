"""The sentence splitter that feeds streamed LLM text to the synthesizer."""

from __future__ import annotations

import pytest
from tts_service.text import SentenceSplitter, clean_for_speech, split_sentences

pytestmark = pytest.mark.fast


def test_abbreviations_decimals_and_numbers_do_not_split() -> None:
    text = "Dr. Smith paid $1,250.75 on Jan. 5, e.g. for 3.14 kg. Was it Mr. Jones? Yes! Done."
    assert split_sentences(text) == [
        "Dr. Smith paid $1,250.75 on Jan. 5, e.g. for 3.14 kg.",
        "Was it Mr. Jones?",
        "Yes!",
        "Done.",
    ]


def test_markdown_and_emoji_are_cleaned() -> None:
    md = "# Title\n\n**Bold** and *italic* with `code` and [a link](http://x.y) 🚀.\n- item one\n- item two"
    assert split_sentences(md) == ["Title", "Bold and italic with code and a link.", "item one", "item two"]
    assert clean_for_speech("Visit https://example.com now 😀") == "Visit a link now "


def test_token_stream_waits_for_the_next_character() -> None:
    s = SentenceSplitter(eager_first=False)
    out = []
    for piece in ["The value", " is 3", ".", "14", " today", ".", " Next", " one", "."]:
        out += s.push(piece)
    assert out == ["The value is 3.14 today."]
    assert s.flush() == ["Next one."]


def test_eager_first_clause_and_long_sentences() -> None:
    s = SentenceSplitter(max_chars=60)
    first = s.push("Well, that is a very good question to ask, and here is my answer ")
    assert first == ["Well, that is a very good question to ask,"]
    long = "word " * 50
    assert all(len(p) <= 60 for p in split_sentences(long, max_chars=60))


def test_first_fragment_of_a_reply_is_cut_early_but_not_on_a_function_word() -> None:
    def stream(text: str) -> list[str]:
        s = SentenceSplitter()
        out: list[str] = []
        for token in text.split(" "):
            out += s.push(token + " ")
        return out + s.flush()

    assert stream("The weather today is sunny with a high of twenty degrees.") == [
        "The weather today is",
        "sunny with a high of twenty degrees.",
    ]
    assert stream("I think that the best way to learn is by doing.")[0] == "I think that the best"
    assert stream("Paris is the capital.") == ["Paris is the capital."]  # a short sentence stays whole
    later = stream("Yes. The weather today is sunny with a high of twenty degrees.")
    assert later == ["Yes.", "The weather today is sunny with a high of twenty degrees."]  # only the first piece


def test_take_words_cuts_now_at_a_word_boundary() -> None:
    s = SentenceSplitter(eager_first=False)
    assert s.push("The capi") == []
    assert s.take_words(2) is None  # "capi" may go on
    s.push("tal of France is ")
    assert s.take_words(2) == "The capital"
    assert s.flush() == ["of France is"]
    s.push("Tell me about the ")
    assert s.take_words(3) is None  # never ends on "about" or "the": waits for the next word
    s.flush()
    s.push("Sure, Mr. Smith will ")
    assert s.take_words(2) == "Sure, Mr. Smith"  # nor on "Mr."


def test_first_piece_is_cut_as_soon_as_the_next_word_begins() -> None:
    """Tokens as an LLM streams them (space first): "John" is whole when " Dash" arrives; waiting for
    "wood" would cost a token (~30-50 ms here) on every reply's first audio."""
    s = SentenceSplitter(first_words=2)
    assert [s.push(t) for t in ("Mr", ".", " John")] == [[], [], []]
    assert s.push(" Dash") == ["Mr. John"]
    s = SentenceSplitter(first_words=2)
    assert [s.push(t) for t in ("The", " capital", " of")] == [[], [], ["The capital"]]
    s = SentenceSplitter(first_words=2)
    assert [s.push(t) for t in ("Tell", " the", " story")] == [[], [], []]  # never ends on "the"
    assert s.push(" now") == ["Tell the story"]
