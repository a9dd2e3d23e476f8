"""Test helpers: real speech, word error rate, free ports, espeak-ng speech."""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from voice_common.audio import load_mono

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


@dataclass(frozen=True)
class Clip:
    path: Path
    text: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    def pcm16(self, rate: int = 16000) -> bytes:
        samples, _ = load_mono(self.data, rate)
        return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def librivox_clips() -> list[Clip]:
    """The five LibriVox clips of Debian's pocketsphinx-testdata with their transcripts."""
    clips = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        m = re.match(r"<s>(.*)</s>\s*\((.+)\)", line.strip())
        if m:
            clips.append(Clip(LIBRIVOX / f"{m.group(2)}.wav", m.group(1).strip()))
    return clips


def normalize(text: str) -> list[str]:
    text = text.lower().replace("mr.", "mister").replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
            prev, d[j] = d[j], cur
    return d[len(hyp)] / max(1, len(ref))


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    errors = sum(wer(r, h) * len(normalize(r)) for r, h in pairs)
    return errors / max(1, sum(len(normalize(r)) for r, _ in pairs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def espeak_wav(text: str, path: Path, rate: int = 16000) -> Path:
    """Synthesize `text` with espeak-ng, resampled to `rate` mono WAV."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True)
    samples, _ = load_mono(raw.read_bytes(), rate)
    import soundfile as sf

    sf.write(path, samples, rate, subtype="PCM_16")
    raw.unlink()
    return path


def silence(ms: int, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(rate * ms / 1000), dtype=np.float32)


def with_pause(samples: np.ndarray, pause_ms: int, rate: int = 16000) -> tuple[np.ndarray, float]:
    """Insert a pause mid-sentence, at the quietest 100 ms between 35 % and 65 % of the speech (a word
    gap). Returns the audio and where the pause starts, in ms."""
    hop = rate // 100  # 10 ms
    frames = samples[: len(samples) // hop * hop].reshape(-1, hop)
    energy = np.convolve(np.sqrt((frames**2).mean(axis=1)), np.ones(10), "same")
    lo, hi = int(len(energy) * 0.35), int(len(energy) * 0.65)
    cut = (lo + int(np.argmin(energy[lo:hi]))) * hop
    pause = np.zeros(int(rate * pause_ms / 1000), dtype=samples.dtype)
    return np.concatenate([samples[:cut], pause, samples[cut:]]), cut * 1000 / rate


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total
