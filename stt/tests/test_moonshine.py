"""Moonshine engine: where it cuts the audio (no model), and the real model through the engine."""

from __future__ import annotations

import numpy as np
import pytest
from stt_service.engine import RATE
from stt_service.moonshine import MAX_CHUNK_S, speech_chunks

from tests.helpers import corpus_wer, librivox_clips, normalize, silence, wer


def tone(ms: int, amp: float = 0.1) -> np.ndarray:
    t = np.arange(ms * RATE // 1000) / RATE
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def gap(ms: int) -> np.ndarray:
    return np.zeros(ms * RATE // 1000, np.float32)


@pytest.mark.fast
def test_silence_has_no_speech_chunks() -> None:
    assert speech_chunks(gap(3000), split=True) == []
    assert speech_chunks(gap(3000), split=False) == []
    assert speech_chunks(np.zeros(10, np.float32), split=True) == []


@pytest.mark.fast
def test_pauses_split_speech_in_their_middle() -> None:
    audio = np.concatenate([gap(200), tone(1000), gap(600), tone(800), gap(100), tone(500), gap(400)])
    chunks = speech_chunks(audio, split=True)
    # the 100 ms gap is inside a phrase; the 600 ms one and the trailing 400 ms are pauses
    assert len(chunks) == 2, chunks
    # each trimmed to its speech and 200 ms either side (the cut fell in the middle of the pause)
    ms = RATE // 1000
    assert chunks == [(0, 1400 * ms), (1600 * ms, 3400 * ms)]
    assert speech_chunks(audio, split=False) == [(0, 3400 * ms)]


@pytest.mark.fast
def test_quiet_recordings_split_at_their_own_pauses() -> None:
    """A recording at -50 dBFS is speech, and its pauses are quieter still."""
    audio = np.concatenate([tone(900, 0.004), gap(500), tone(900, 0.004)])
    assert len(speech_chunks(audio, split=True)) == 2


@pytest.mark.fast
def test_long_speech_without_pauses_is_cut_below_the_model_limit() -> None:
    audio = tone(45_000)
    audio[int(17.3 * RATE) : int(17.3 * RATE) + 320] = 0  # the quietest place in its window
    chunks = speech_chunks(audio, split=False)
    assert all(b - a <= MAX_CHUNK_S * RATE for a, b in chunks)
    assert chunks[0][1] == int(17.3 * RATE) // 320 * 320
    assert chunks[-1][1] == len(audio) and all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    lead = np.concatenate([gap(2000), tone(1000), gap(2000)])
    assert speech_chunks(lead, split=False) == [(1800 * RATE // 1000, 3200 * RATE // 1000)]


@pytest.fixture(scope="module")
def moonshine():
    from stt_service.moonshine import Moonshine
    from voice_common.settings import default_models_dir

    return Moonshine(default_models_dir() / "stt" / "moonshine-base", threads=2)


def test_real_model_transcribes_librivox(moonshine) -> None:
    from voice_common.audio import pcm16_to_float32

    pairs = []
    for clip in librivox_clips():
        r = moonshine.transcribe(pcm16_to_float32(clip.pcm16()), timestamps=False)
        assert r.language == "en" and len(r.segments) == 1 and r.segments[0].avg_logprob < 0
        pairs.append((clip.text, r.text))
    assert corpus_wer(pairs) < 0.10, pairs


def test_real_model_segments_at_pauses_and_skips_silence(moonshine) -> None:
    from voice_common.audio import pcm16_to_float32
    from voice_common.errors import ApiError

    clips = librivox_clips()
    a, b = (pcm16_to_float32(clips[i].pcm16()) for i in (1, 4))
    audio = np.concatenate([silence(1500), a, silence(800), b, silence(1500)])
    seen: list[object] = []
    r = moonshine.transcribe(audio, on_segment=seen.append)
    assert len(r.segments) == 2 and seen == r.segments
    assert wer(clips[1].text, r.segments[0].text) < 0.2 and wer(clips[4].text, r.segments[1].text) < 0.2
    assert r.segments[0].end < 1.5 + len(a) / RATE + 0.8 < r.segments[1].end
    empty = moonshine.transcribe(silence(5000))
    assert empty.text == "" and empty.segments == []
    with pytest.raises(ApiError) as err:
        moonshine.transcribe(a, word_timestamps=True)
    assert err.value.status == 400 and err.value.code == "word_timestamps_unsupported"
    with pytest.raises(ApiError) as err:
        moonshine.transcribe(a, task="translate")
    assert err.value.code == "translation_unsupported"


def test_real_model_gives_up_when_superseded(moonshine) -> None:
    """A decode whose `stop` is set ends early with `Superseded` instead of finishing a stale transcript."""
    import threading

    from stt_service.engine import Superseded
    from voice_common.audio import pcm16_to_float32

    audio = pcm16_to_float32(librivox_clips()[0].pcm16())  # 7 s: far more than 50 ms of decoding
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(Superseded):
        moonshine.transcribe(audio, timestamps=False, stop=stop)
    with pytest.raises(Superseded):
        moonshine.transcribe(audio, stop=stop)  # already set: nothing is decoded


class CountingSession:
    """An onnxruntime session that counts its runs (decoder steps)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.runs = inner, 0

    def run(self, *args: object, **kwargs: object) -> object:
        self.runs += 1
        return self.inner.run(*args, **kwargs)  # type: ignore[attr-defined]


def test_real_model_checks_a_draft_instead_of_generating_it(moonshine, monkeypatch) -> None:
    """A live utterance's final, drafted by its last interim: the same words in a fraction of the decoder
    steps; a draft of other words is rejected token by token and changes nothing."""
    from dataclasses import replace

    from voice_common.audio import pcm16_to_float32

    clips = librivox_clips()
    steps = CountingSession(moonshine.step)
    monkeypatch.setattr(moonshine, "step", steps)
    for clip, other in zip(clips, clips[1:] + clips[:1], strict=True):
        audio = pcm16_to_float32(clip.pcm16())
        interim = moonshine.transcribe(audio[: len(audio) * 85 // 100], timestamps=False)
        steps.runs = 0
        plain = moonshine.transcribe(audio, timestamps=False)
        plain_steps, steps.runs = steps.runs, 0
        drafted = moonshine.transcribe(audio, timestamps=False, draft=interim)
        assert normalize(drafted.text) == normalize(plain.text), (drafted.text, plain.text)
        assert steps.runs < plain_steps / 2, (clip.text, steps.runs, plain_steps)
        elsewhere = moonshine.transcribe(pcm16_to_float32(other.pcm16()), timestamps=False)
        misleading = replace(elsewhere, segments=[replace(elsewhere.segments[0], start=plain.segments[0].start)])
        wrong = moonshine.transcribe(audio, timestamps=False, draft=misleading)
        assert normalize(wrong.text) == normalize(plain.text), (wrong.text, plain.text)
