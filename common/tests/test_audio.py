from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from voice_common.audio import (
    AudioError,
    AudioFormat,
    AudioTooLong,
    StreamResampler,
    decode_audio,
    encode_audio,
    float32_to_pcm16,
    load_mono,
    pcm16_to_float32,
    pcm_to_mono_float,
    resample,
)

pytestmark = pytest.mark.fast


def tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_decode_any_container_downmix_and_resample(fmt: str) -> None:
    stereo = np.stack([tone(44100), tone(44100)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 44100, format=fmt)
    samples, rate = load_mono(buf.getvalue(), 16000)
    assert rate == 44100 and samples.ndim == 1 and abs(len(samples) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - 440) < 5


def test_bad_audio_is_an_audio_error() -> None:
    for data in (b"", b"garbage" * 10):
        with pytest.raises(AudioError):
            decode_audio(data)
    with pytest.raises(AudioError):
        pcm_to_mono_float(b"\x00", AudioFormat())
    with pytest.raises(AudioError):
        pcm_to_mono_float(b"", AudioFormat())
    with pytest.raises(AudioError):
        AudioFormat(width=3).check()


def silent_flac(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="FLAC")
    return buf.getvalue()


def test_too_long_audio_is_refused_from_its_header() -> None:
    hour = silent_flac(3600)
    assert len(hour) < 2_000_000  # an hour of silence is small: the size limit alone does not stop it
    with pytest.raises(AudioTooLong) as refused:
        decode_audio(hour, max_seconds=600)
    assert refused.value.code == "audio_too_long" and "3600 s" in str(refused.value)
    samples, rate = decode_audio(silent_flac(5), max_seconds=600)
    assert rate == 8000 and samples.shape == (40000, 1)


def test_pcm16_round_trip_and_stereo_frames() -> None:
    x = tone(16000, 0.1)
    assert np.allclose(pcm16_to_float32(float32_to_pcm16(x)), x, atol=1e-4)
    stereo = np.stack([x, -x], axis=1).reshape(-1)
    mono = pcm_to_mono_float(float32_to_pcm16(stereo), AudioFormat(channels=2))
    assert np.allclose(mono, 0, atol=1e-4)
    f32 = pcm_to_mono_float(x.astype("<f4").tobytes(), AudioFormat(width=4))
    assert np.allclose(f32, x)


def test_stream_resampler_matches_one_shot() -> None:
    x = tone(48000, 1.0)
    r = StreamResampler(48000, 16000)
    chunks = [r(x[i : i + 960]) for i in range(0, len(x), 960)] + [r(np.zeros(0, np.float32), last=True)]
    streamed = np.concatenate(chunks)
    assert abs(len(streamed) - 16000) <= 2
    assert np.allclose(streamed[100:15000], resample(x, 48000, 16000)[100:15000], atol=1e-3)


@pytest.mark.parametrize(("src", "dst"), [(24000, 16000), (48000, 16000), (22050, 24000)])
def test_stream_resampler_holds_back_little(src: int, dst: int) -> None:
    """A live stream's audio comes out within 10 ms (soxr's HQ held back 21-33 ms of these)."""
    r = StreamResampler(src, dst)
    out = sum(len(r(np.zeros(src // 50, np.float32))) for _ in range(50))  # one second in 20 ms frames
    assert dst - out <= dst // 100


@pytest.mark.parametrize(("fmt", "container"), [("wav", "WAV"), ("flac", "FLAC"), ("mp3", "MP3"), ("opus", "OGG")])
def test_encode_audio(fmt: str, container: str) -> None:
    data = encode_audio(tone(22050), 22050, fmt)
    info = sf.info(io.BytesIO(data))
    assert info.format == container and abs(info.duration - 1.0) < 0.1
