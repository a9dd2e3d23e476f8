"""Audio helpers every service needs: decode, downmix, resample, PCM16 <-> float32, WAV out.

Models want mono float32 at a fixed rate; clients send whatever they have. Everything converges here.
"""

from __future__ import annotations

import functools
import io
from typing import Any, ClassVar

import numpy as np
import soundfile as sf
import soxr
from pydantic import BaseModel, Field


class AudioError(ValueError):
    """Audio that cannot be used: undecodable, empty, or in a format we do not take."""

    code = "invalid_audio"


class AudioTooLong(AudioError):
    """Longer than the service takes: refused from the header, before decoding (a few hundred KB of FLAC
    can hold hours of silence)."""

    code = "audio_too_long"


class AudioFormat(BaseModel):
    """Raw PCM layout; it travels with every stream (like wyoming's audio-start)."""

    rate: int = Field(16000, ge=8000, le=192000)
    width: int = Field(2, description="bytes per sample: 2 = PCM16, 4 = float32")
    channels: int = Field(1, ge=1, le=8)

    def check(self) -> None:
        if self.width not in (2, 4):
            raise AudioError(f"unsupported sample width {self.width}: use 2 (PCM16) or 4 (float32)")

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels


def decode_audio(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any container soundfile reads (WAV, FLAC, OGG, ...) to float32 (frames, channels). With
    `max_seconds`, longer audio is refused before it is decoded, and never more than that is read."""
    if not data:
        raise AudioError("empty audio file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            limit = None if max_seconds is None else int(max_seconds * rate)
            if limit is not None and f.frames > limit:
                raise AudioTooLong(f"audio is {f.frames / rate:.0f} s; the limit is {max_seconds:.0f} s")
            samples = f.read(frames=-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # soundfile raises several types for garbage input
        raise AudioError(f"could not decode audio: {exc}") from exc
    if limit is not None and samples.shape[0] > limit:  # a header that under-reported its length
        raise AudioTooLong(f"audio is over the limit of {max_seconds:.0f} s")
    if samples.shape[0] == 0:
        raise AudioError("audio file has no samples")
    return samples, rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average channels: (frames, channels) -> (frames,)."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """High-quality one-shot resampling (soxr); a no-op when the rates match."""
    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    return np.asarray(soxr.resample(samples, src_rate, dst_rate), dtype=np.float32)


def load_mono(data: bytes, rate: int, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a file to mono float32 at `rate` (what every model here consumes) and its source rate."""
    samples, src_rate = decode_audio(data, max_seconds)
    return resample(to_mono(samples), src_rate, rate), src_rate


def pcm16_to_float32(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise AudioError("PCM16 data must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float32_to_pcm16_array(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def float32_to_pcm16(samples: np.ndarray) -> bytes:
    return float32_to_pcm16_array(samples).tobytes()


def pcm_to_mono_float(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """Raw interleaved PCM in `fmt` -> mono float32 at fmt.rate."""
    fmt.check()
    if not data:
        raise AudioError("empty audio frame")
    if len(data) % fmt.frame_bytes:
        raise AudioError(f"frame of {len(data)} bytes is not a whole number of {fmt.frame_bytes}-byte samples")
    if fmt.width == 2:
        samples = pcm16_to_float32(data)
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if fmt.channels > 1:
        samples = samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
    return samples


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """Mono float32 -> 16-bit WAV bytes."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Mono float32 -> a container soundfile writes (wav, flac, ogg/opus, mp3 where libsndfile has it)."""
    formats = {
        "wav": ("WAV", "PCM_16"),
        "flac": ("FLAC", "PCM_16"),
        "ogg": ("OGG", "VORBIS"),
        "opus": ("OGG", "OPUS"),
        "mp3": ("MP3", "MPEG_LAYER_III"),
    }
    if fmt == "pcm":
        return float32_to_pcm16(samples)
    container, subtype = formats[fmt]
    if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
        samples, rate = resample(samples, rate, 48000), 48000
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=container, subtype=subtype)
    return buf.getvalue()


class _Sink:
    """A write-only, non-seekable file for PyAV's muxer: it cannot go back to patch headers, so it
    writes a stream's bytes in order, and `take` hands out what has been written since the last call."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class StreamEncoder:
    """Encode audio chunk by chunk into one compressed stream (PyAV/FFmpeg), so the first bytes of a
    long reply go out while the rest is synthesised. mp3, opus (in ogg, 20 ms pages), aac (ADTS), wav.
    FLAC is not streamed: without a sample count in its header libsndfile cannot read it."""

    FORMATS: ClassVar[
        dict[str, tuple[str, str, int | None]]
    ] = {  # container, codec, the rate the codec needs (None: the input's)
        "mp3": ("mp3", "libmp3lame", None),
        "opus": ("ogg", "libopus", 48000),
        "aac": ("adts", "aac", None),
        "wav": ("wav", "pcm_s16le", None),
    }

    def __init__(self, fmt: str, rate: int) -> None:
        import av

        container, codec, codec_rate = self.FORMATS[fmt]
        self.rate = rate
        self.sink = _Sink()
        options = {"page_duration": "20000"} if container == "ogg" else {}
        self.out = av.open(self.sink, mode="w", format=container, options=options)
        self.stream: Any = self.out.add_stream(codec, rate=codec_rate or rate, layout="mono")

    def encode(self, samples: np.ndarray) -> bytes:
        """Mono float32 at `rate` in; whatever the muxer has written so far out (may be empty)."""
        import av

        frame = av.AudioFrame.from_ndarray(float32_to_pcm16_array(samples).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        for packet in self.stream.encode(frame):  # PyAV resamples to the codec's rate and frame size
            self.out.mux(packet)
        return self.sink.take()

    def close(self) -> bytes:
        """The encoder's tail and the container's trailer."""
        for packet in self.stream.encode(None):
            self.out.mux(packet)
        self.out.close()
        return self.sink.take()


@functools.cache
def live_quality(src_rate: int, dst_rate: int) -> str:
    """The soxr quality with the least delay for this pair of rates. A live stream waits for the filter:
    at HQ a 24 kHz (Realtime API) or 48 kHz mic reaches the VAD 21 ms late, at LQ 6 ms; LQ's 16-bit
    precision is still beyond what a microphone gives. Measured once per pair: the delay does not follow
    the quality order (8 kHz -> 16 kHz is shortest at MQ)."""
    probe = np.zeros(src_rate // 5, np.float32)  # 200 ms: what comes out is what the filter let through

    def delay(quality: str) -> int:
        stream = soxr.ResampleStream(src_rate, dst_rate, 1, dtype="float32", quality=quality)
        return -len(stream.resample_chunk(probe))

    return min(("LQ", "MQ", "HQ"), key=delay)


class StreamResampler:
    """Chunk-by-chunk resampler for live streams: keeps filter state across frames, with the least delay."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.passthrough = src_rate == dst_rate
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(src_rate, dst_rate, 1, dtype="float32", quality=live_quality(src_rate, dst_rate))
        )

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.float32)
